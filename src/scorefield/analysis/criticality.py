"""Out-of-equilibrium criticality of the reverse process (ambrogioni-phase-transitions-full.txt).

What lives here, each equation once:
- `correlation_length`: the pattern correlation length of a field on the periodic lattice, either the
  first moment of the binarized autocorrelation (App. E.6, eq. 61–63) or the second moment of the
  mean-subtracted luminance autocorrelation (App. G.3).
- `mode_softening`: directional derivatives λ_v = vᵀJv / vᵀv of the reverse drift along the Fourier modes
  cos(n k_min i), cos(n k_min j), n = 0..shells (App. E.8–E.9, eq. 64–66), by exact JVP or by the paper's
  symmetric finite difference with adaptive ε, and ξ_eq from λ_n/λ_0 ≈ 1 + ξ_eq² (n k_min)² (App. E.10, eq. 67–69).
- `ginzburg_landau_two_state`, `critical_time_two_state`: the tree-level Ginzburg–Landau parameters of the
  two-state patch model and its critical time (App. A, eq. 15–22).
- `uniform_mode_eigenvalue`: the quadratic coefficient r(t) measured from a machine by autograd.

The reverse drift. The paper linearizes the drift of its reverse SDE (eq. 58, β = 1),
b(x, t) = −½x − s(x, t); for a VP schedule with γ_t = −½ d log ᾱ/dt this is b = f − g²s = −γ_t x − 2γ_t s
(forward-time coordinates, integrated from T down to t_min). `drift="probability_flow"` instead uses
v = −γ_t (x + s) (scorefield.convert.drift_from_x0). The score s comes from the model's x̂₀ by Tweedie.

Sign conventions. λ_v is the Rayleigh quotient of J = ∂b/∂x along v, normalized by vᵀv (eq. 64 omits the
vᵀv; without it a cosine mode, with vᵀv = CHW/2, would read half the uniform mode's vᵀv = CHW). Since b is the
forward-time drift, a mode with λ_v > 0 decays as the reverse process runs t downward (stable), and λ_v → 0 is
a soft mode. On a smooth branch the higher shells are stiffer, λ_n/λ_0 > 1 and ξ_eq² > 0; when the fit gives
ξ_eq² ≤ 0 (or λ_0 = 0) there is no real ξ_eq and NaN is returned.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import convert
from ..schedules import Schedule, get_schedule

Tensor = torch.Tensor

LUMINANCE = (0.2989, 0.5870, 0.1140)          # App. G.3: ℓ = 0.2989R + 0.5870G + 0.1140B
CORRELATION_METHODS = ("binary", "continuous")
SOFTENING_METHODS = ("jvp", "finite_difference")
DRIFTS = ("reverse_sde", "probability_flow")
XI_EQ_SHELLS = (1, 2, 3)                      # App. E.10: fit over the lowest shells n = 1, 2, 3


# ---- argument checks -------------------------------------------------------------------------------------------

def _check_images(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, C, H, W], got {type(x).__name__}")
    if x.ndim != 4 or min(x.shape) < 1:
        raise ValueError(f"{name} must have shape [N, C, H, W] with every size ≥ 1, got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to(torch.float64)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_alpha_bar(alpha_bar: Tensor | float, n: int) -> Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).detach().cpu()
    if ab.ndim == 0:
        ab = ab.expand(n)
    if ab.shape != (n,):
        raise ValueError(f"alpha_bar must be a scalar or shape [{n}], got shape {tuple(ab.shape)}")
    if not bool(((ab > 0) & (ab < 1)).all()):
        raise ValueError("alpha_bar must lie in the open interval (0, 1)")
    return ab.clone()


# ---- correlation length (App. E.6, G.3) ------------------------------------------------------------------------

def _autocorrelation(field: Tensor) -> Tensor:
    """C(Δ) = (1/HW) Σ_i f_i f_{i+Δ} on the periodic lattice via FFT (eq. 62); field [N, C, H, W] -> [N, H, W]
    (averaged over channels)."""
    h, w = field.shape[-2:]
    f = torch.fft.fft2(field)
    return torch.fft.ifft2(f * f.conj()).real.mean(1) / (h * w)                  # [N, H, W]


def _radial_bins(h: int, w: int) -> tuple[Tensor, int]:
    """Integer radius round(|Δ|) of each periodic displacement (minimal image), and r_max = ⌊min(H, W)/2⌋."""
    di = torch.arange(h, dtype=torch.float64)
    dj = torch.arange(w, dtype=torch.float64)
    di = torch.minimum(di, h - di)
    dj = torch.minimum(dj, w - dj)
    radius = torch.sqrt(di[:, None] ** 2 + dj[None, :] ** 2).round().long()       # [H, W]
    return radius, min(h, w) // 2


def radial_average(corr: Tensor) -> Tensor:
    """Radial average of a periodic correlation C(Δ) over round(|Δ|) = r, r = 0..⌊min(H, W)/2⌋ (App. E.6);
    [N, H, W] -> [N, R+1]."""
    radius, r_max = _radial_bins(*corr.shape[-2:])
    radius = radius.to(corr.device)
    keep = radius <= r_max
    idx = radius[keep]                                                          # [M]
    sums = torch.zeros(corr.shape[0], r_max + 1, dtype=torch.float64, device=corr.device)
    sums.index_add_(1, idx, corr[:, keep].to(torch.float64))
    counts = torch.bincount(idx, minlength=r_max + 1).to(torch.float64)
    return sums / counts                                                        # [N, R+1]


def radial_correlation(field: Tensor) -> Tensor:
    """Radially averaged periodic autocorrelation C(r) of a field (eq. 62); [N, C, H, W] -> [N, R+1]."""
    return radial_average(_autocorrelation(field))


def _positive_part(c: Tensor) -> Tensor:
    """The positive portion of C(r): C up to (not including) its first non-positive value, zero beyond."""
    positive = (c > 0).to(torch.int64).cumprod(-1)                              # 1 until the first C(r) ≤ 0
    return c * positive


def moment_length(c: Tensor, power: int) -> Tensor:
    """(Σ_r r^p C(r) / Σ_r C(r))^{1/p} over the positive portion of C; [N, R+1] -> [N] (NaN if C(0) ≤ 0)."""
    c = _positive_part(c)
    r = torch.arange(c.shape[-1], dtype=torch.float64, device=c.device)
    den = c.sum(-1)
    ratio = (r**power * c).sum(-1) / den
    return torch.where(den > 0, ratio ** (1.0 / power), torch.full_like(den, float("nan")))


def _luminance(x: Tensor) -> Tensor:
    """ℓ = 0.2989R + 0.5870G + 0.1140B for C = 3, the field itself for C = 1 (App. G.3); -> [N, 1, H, W]."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] == 3:
        weights = torch.tensor(LUMINANCE, dtype=torch.float64, device=x.device)   # [3]
        return (x * weights[None, :, None, None]).sum(1, keepdim=True)
    raise ValueError(f"x: method='continuous' needs 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")


def correlation_length(x: Tensor, method: str = "binary") -> Tensor:
    """Pattern correlation length per image on the periodic lattice; x [N, C, H, W] -> [N] float64.

    method="binary" (App. E.6): s = sign(x) (eq. 61); C(r) the radially averaged FFT autocorrelation
    (1/N)Σ_{|i−j|=r} s_i s_j (eq. 62), averaged over channels; ξ = Σ_r r C(r) / Σ_r C(r) over the positive
    portion of C (eq. 63), taken as r = 0 up to the first r with C(r) ≤ 0.
    method="continuous" (App. G.3): luminance ℓ (C = 3) or the field (C = 1), minus its spatial mean;
    C(r) = ⟨ℓ̃(x)ℓ̃(x+r)⟩ radially averaged; ξ = √(Σ_r r² C(r) / Σ_r C(r)), over the same positive portion
    (the mean-subtracted C sums to zero over all displacements, so a cut is needed for a finite ratio).
    Radii are round(|Δ|) of minimal-image displacements, r ≤ ⌊min(H, W)/2⌋. A field with C(0) = 0 gives NaN.
    """
    method = _check_choice(method, CORRELATION_METHODS, "method")
    x = _check_images(x)
    if method == "binary":
        return moment_length(radial_correlation(torch.sign(x)), power=1)
    lum = _luminance(x)
    lum = lum - lum.mean(dim=(-2, -1), keepdim=True)
    return moment_length(radial_correlation(lum), power=2)


# ---- Ginzburg–Landau parameters of the two-state patch model (App. A) ------------------------------------------

@dataclass(frozen=True)
class GinzburgLandau:
    """Tree-level GL coefficients at times t (App. A): r (eq. 15), κ (eq. 16), u (eq. 17), each like t."""

    t: Tensor
    r: Tensor
    kappa: Tensor
    u: Tensor


def _alpha_sigma_sq(t: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """α² = e^{−βt}, σ² = 1 − e^{−βt} of the constant-β VP process (eq. 52–53 for β = 1)."""
    a2 = torch.exp(-beta * t)
    return a2, -torch.expm1(-beta * t)


def patch_geometry(patch_area: int) -> tuple[int, float]:
    """|Ω| and c_Ω of a square P×P receptive field, P² = patch_area, P odd.

    c_Ω is defined by Σ_{u∈Ω} x_{i+u} ≈ |Ω|φ + c_Ω∇²φ (main text before eq. 15); for a square patch with
    offsets −R..R, c_Ω = ½ Σ_{u∈Ω} u_x² = P²R(R+1)/6."""
    if isinstance(patch_area, bool) or not isinstance(patch_area, int) or patch_area < 1:
        raise ValueError(f"patch_area must be a positive int |Ω| = P², got {patch_area!r}")
    p = math.isqrt(patch_area)
    if p * p != patch_area or p % 2 == 0:
        raise ValueError(f"patch_area must be the square of an odd patch size P, got {patch_area}")
    radius = p // 2
    return patch_area, p * p * radius * (radius + 1) / 6.0


def ginzburg_landau_two_state(t: Tensor | float, patch_area: int, beta: float = 1.0) -> GinzburgLandau:
    """r(t) = 1/σ² − α²|Ω|/σ⁴ (eq. 15), κ(t) = α² c_Ω/σ⁴ (eq. 16), u(t) = α⁴|Ω|³/(3σ⁸) (eq. 17) with the
    constant-β VP process α² = e^{−βt}, σ² = 1 − e^{−βt}; c_Ω from `patch_geometry` (square patch).
    t > 0 (float or tensor); results are float64 tensors shaped like t."""
    beta = _check_positive(beta, "beta")
    omega, c_omega = patch_geometry(patch_area)
    t = torch.as_tensor(t, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError("t must be finite and > 0 (σ²(0) = 0)")
    a2, s2 = _alpha_sigma_sq(t, beta)
    r = 1 / s2 - a2 * omega / s2**2
    kappa = a2 * c_omega / s2**2
    u = a2**2 * omega**3 / (3 * s2**4)
    return GinzburgLandau(t=t, r=r, kappa=kappa, u=u)


def critical_time_two_state(patch_area: int = 25, beta: float = 1.0) -> float:
    """Tree-level critical time from r(t_c) = 0 (eq. 18–20): α²(t_c) = 1/(1+|Ω|); for a constant schedule
    β(t) = β, ∫₀^{t_c} β = log(1+|Ω|) (eq. 21) gives t_c = log(1+|Ω|)/β (eq. 22 for β = 1)."""
    if isinstance(patch_area, bool) or not isinstance(patch_area, int) or patch_area < 1:
        raise ValueError(f"patch_area must be a positive int |Ω|, got {patch_area!r}")
    beta = _check_positive(beta, "beta")
    return math.log1p(patch_area) / beta


# ---- the reverse drift and its directional derivatives (App. E.8–E.10) -----------------------------------------

Model = Callable[[Tensor, Tensor], Tensor]


def reverse_drift(model: Model, x: Tensor, alpha_bar: Tensor, gamma: Tensor, drift: str = "reverse_sde") -> Tensor:
    """b(x) of the reverse process at x [B, C, H, W], ᾱ [B], γ_t [B] -> [B, C, H, W].

    "reverse_sde": b = −γx − 2γs (eq. 58: −½x − s for β = 1); "probability_flow": v = −γ(x + s)
    (kamb-ganguli eq. 19); s = (√ᾱ x̂₀ − x)/(1−ᾱ) from the model's x̂₀."""
    x0 = model(x, alpha_bar)
    if drift == "probability_flow":
        return convert.drift_from_x0(x, x0, alpha_bar, gamma)
    g = gamma.reshape(-1, 1, 1, 1)
    return -g * x - 2 * g * convert.score_from_x0(x, x0, alpha_bar)


def fourier_modes(shape: tuple[int, int, int], shells: int) -> Tensor:
    """Directions [2·shells+1, C, H, W]: the uniform mode (n = 0), then cos(n k_i i) for n = 1..shells, then
    cos(n k_j j) (eq. 65–66), k_i = 2π/H, k_j = 2π/W (k_min = 2π/L); every channel carries the same mode."""
    c, h, w = shape
    i = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    j = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    modes = [torch.ones(h, w, dtype=torch.float64)]
    modes += [torch.cos(n * 2 * math.pi / h * i) for n in range(1, shells + 1)]
    modes += [torch.cos(n * 2 * math.pi / w * j) for n in range(1, shells + 1)]
    return torch.stack(modes)[:, None].expand(-1, c, h, w).contiguous()


def _rayleigh(v: Tensor, jv: Tensor) -> Tensor:
    """vᵀ(Jv) / vᵀv per row; [B, C, H, W] -> [B]."""
    return (v * jv).flatten(1).sum(1) / (v * v).flatten(1).sum(1)


def _directional_jvp(b: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    """Exact J v by forward-mode differentiation (float64 autograd route of the machines)."""
    _, jv = torch.autograd.functional.jvp(b, x, v)
    return jv


def fd_epsilon(alpha_bar: Tensor) -> Tensor:
    """Adaptive step ε = max(5·10⁻⁵, 10⁻³ σ²) with σ² = 1 − ᾱ (App. E.8); [B] -> [B]."""
    return torch.clamp(1e-3 * (1 - alpha_bar), min=5e-5)


def _directional_fd(b: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
    """Symmetric difference [b(x+εv) − b(x−εv)]/(2ε) (eq. 64), ε per row [B]."""
    e = eps.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        return (b(x + e * v) - b(x - e * v)) / (2 * e)


@dataclass(frozen=True)
class ModeSoftening:
    """Directional derivatives of the reverse drift along Fourier shells and the fitted ξ_eq.

    lambdas: [N, shells+1], λ_n = mean of the i- and j-direction values (λ_0: the uniform mode);
    lambdas_i, lambdas_j: [N, shells+1] per direction (column 0 is the uniform mode in both);
    k_i, k_j: [shells+1] wavenumbers n·2π/H, n·2π/W; xi_eq: [N] (NaN where ξ_eq² ≤ 0 or λ_0 = 0);
    drift, method: what was measured and how."""

    lambdas: Tensor
    lambdas_i: Tensor
    lambdas_j: Tensor
    k_i: Tensor
    k_j: Tensor
    xi_eq: Tensor
    drift: str
    method: str


def fit_xi_eq(lambdas_i: Tensor, lambdas_j: Tensor, k_i: Tensor, k_j: Tensor,
              shells: tuple[int, ...] = XI_EQ_SHELLS) -> Tensor:
    """Least-squares ξ_eq² of λ_n/λ_0 − 1 = ξ_eq² (n k_min)² (eq. 67–69) through the origin, both directions
    jointly over `shells`; [N, S+1] -> [N]; NaN where ξ_eq² ≤ 0 or λ_0 = 0 (no real ξ_eq)."""
    idx = list(shells)
    lam0 = lambdas_i[:, :1]                                                    # [N, 1]
    y = torch.cat([lambdas_i[:, idx], lambdas_j[:, idx]], 1) / lam0 - 1         # [N, 2S']
    k2 = torch.cat([k_i[idx], k_j[idx]]) ** 2                                  # [2S']
    xi2 = (y * k2).sum(1) / (k2 * k2).sum()
    ok = torch.isfinite(xi2) & (xi2 > 0) & (lam0[:, 0] != 0)
    return torch.where(ok, xi2.clamp_min(0).sqrt(), torch.full_like(xi2, float("nan")))


def _check_shells(shells: int) -> int:
    if isinstance(shells, bool) or not isinstance(shells, int) or shells < max(XI_EQ_SHELLS):
        raise ValueError(f"shells must be an int ≥ {max(XI_EQ_SHELLS)} (ξ_eq is fitted over shells 1–3), "
                         f"got {shells!r}")
    return shells


def _gamma_of(schedule: str | Schedule, ab: Tensor) -> Tensor:
    try:
        sched = get_schedule(schedule)
    except ValueError as exc:
        raise ValueError(f"schedule: {exc}") from exc
    return sched.gamma(sched.t_from_alpha_bar(ab)).to(torch.float64).expand_as(ab)


def mode_softening(model: Model, x: Tensor, alpha_bar: Tensor | float, schedule: str | Schedule = "constant",
                   shells: int = 6, method: str = "jvp", drift: str = "reverse_sde") -> ModeSoftening:
    """λ_v = vᵀJv / vᵀv of the reverse drift b (module docstring) at states x [N, C, H, W] and ᾱ (scalar or
    [N]), along the uniform mode and cos(n k_min i), cos(n k_min j), n = 1..shells (App. E.8–E.9);
    method="jvp": exact Jv by autograd; method="finite_difference": eq. 64 with ε = max(5·10⁻⁵, 10⁻³σ²).
    γ_t comes from `schedule` at t(ᾱ). ξ_eq is fitted over shells 1–3 (App. E.10, eq. 67–69)."""
    method = _check_choice(method, SOFTENING_METHODS, "method")
    drift = _check_choice(drift, DRIFTS, "drift")
    shells = _check_shells(shells)
    if not callable(model):
        raise ValueError("model must be callable as model(x, alpha_bar) -> x̂₀")
    x = _check_images(x)
    n, m = x.shape[0], 2 * shells + 1
    ab = _check_alpha_bar(alpha_bar, n).to(x.device)
    gamma = _gamma_of(schedule, ab.cpu()).to(x.device)
    modes = fourier_modes(tuple(x.shape[1:]), shells).to(x.device)              # [M, C, H, W]
    xs = x.repeat_interleave(m, 0)                                               # [N·M, C, H, W]
    vs = modes.repeat(n, 1, 1, 1)                                                # [N·M, C, H, W]
    abs_, gs = ab.repeat_interleave(m), gamma.repeat_interleave(m)               # [N·M]

    def b(z: Tensor) -> Tensor:
        return reverse_drift(model, z, abs_, gs, drift).to(torch.float64)

    if method == "jvp":
        jv = _directional_jvp(b, xs, vs)
    else:
        jv = _directional_fd(b, xs, vs, fd_epsilon(abs_))
    lam = _rayleigh(vs, jv).detach().reshape(n, m)                               # [N, M]
    lam_i = torch.cat([lam[:, :1], lam[:, 1:shells + 1]], 1)                     # [N, S+1]
    lam_j = torch.cat([lam[:, :1], lam[:, shells + 1:]], 1)                      # [N, S+1]
    h, w = x.shape[-2:]
    k_i = torch.arange(shells + 1, dtype=torch.float64) * 2 * math.pi / h
    k_j = torch.arange(shells + 1, dtype=torch.float64) * 2 * math.pi / w
    lam_i, lam_j = lam_i.cpu(), lam_j.cpu()
    return ModeSoftening(lambdas=(lam_i + lam_j) / 2, lambdas_i=lam_i, lambdas_j=lam_j, k_i=k_i, k_j=k_j,
                         xi_eq=fit_xi_eq(lam_i, lam_j, k_i, k_j), drift=drift, method=method)


def uniform_mode_eigenvalue(model: Model, alpha_bar: Tensor | float, shape: tuple[int, int, int] | None = None
                            ) -> Tensor:
    """The GL quadratic coefficient r along the uniform mode, measured by autograd at the zero field:
    r = −vᵀ(∂s/∂x)v / vᵀv with v = 1 and s = (√ᾱ x̂₀ − x)/(1−ᾱ), i.e. the curvature of −log p_t along the
    uniform mode (eq. 15 for the two-state machine). ᾱ scalar or [B] -> [B] float64. `shape` (C, H, W)
    defaults to the model's `image_shape`. (For the reverse-SDE drift, λ_0 = −γ + 2γ r at x = 0.)"""
    if not callable(model):
        raise ValueError("model must be callable as model(x, alpha_bar) -> x̂₀")
    shape = shape if shape is not None else getattr(model, "image_shape", None)
    if shape is None or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) (or the model must have image_shape), got {shape!r}")
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).detach().cpu().reshape(-1)
    ab = _check_alpha_bar(ab, ab.shape[0])
    x = torch.zeros(ab.shape[0], *shape, dtype=torch.float64)                    # [B, C, H, W]
    v = torch.ones_like(x)

    def score(z: Tensor) -> Tensor:
        return convert.score_from_x0(z, model(z, ab), ab).to(torch.float64)

    _, jv = torch.autograd.functional.jvp(score, x, v)
    return -_rayleigh(v, jv).detach()
