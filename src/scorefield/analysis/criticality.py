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
- `smooth_log_time`, `log_time_derivative`: Gaussian smoothing in log t and dξ/d log t (App. E.7);
  `median_peak`, `critical_time_from_xi_eq`: the empirical critical time = argmax of the median ξ_eq over
  trajectories (App. E.12, H.3) and the peak times of the other curves; `instability_window`: where the median
  drift along the uniform mode λ_0 is ≤ 0 (ξ_eq has no real value there).
- Critical-time theory on the schedule in use (every criterion is a target ᾱ = α², then t = t(ᾱ)):
  the two-state tree level ᾱ = 1/(1+|Ω|) (eq. 20–22); the spectral criterion of a random ± dictionary,
  σ²(t_c) = α²(t_c)·λ_max(C) ⇔ ᾱ = 1/(1+λ_max(C)) with C the patch covariance (App. B.6, eq. 30, 42–43);
  the zero-field lattice instability of the dictionary machine itself, ᾱ = 1/(1+max_k K̂(k)); and the
  speciation time of Biroli et al. 2024 (`speciation_alpha_bar`, conversion derived there).
  `critical_time_table` puts them, and measured peak times, in one table.
- `PatchDictionaryDenoiser`: the `dictionary` machine's exact patch posterior (eq. 54–57) written as one
  circular convolution per pattern, equal to the machine to float64 rounding and ≈6× faster (80×80 lattice,
  one CPU thread: 0.7 ms against 4.3 ms per call).

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


# ---- dξ/d log t (App. E.7) and the peak times of the curves (App. E.12) ------------------------------------------

DEFAULT_SMOOTHING = 0.1       # Gaussian width in natural-log time; App. E.7 smooths but gives no width
PEAK_MODES = ("max", "min")


def _curves(values: Tensor, t: Tensor) -> tuple[Tensor, Tensor, bool]:
    """values [N, T] or [T] and times [T] as float64 (values may hold NaN); returns (values [N, T], t, was 1-D)."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    if tt.ndim != 1 or tt.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of at least 2 times, got shape {tuple(tt.shape)}")
    if not bool(torch.isfinite(tt).all()) or not bool((tt > 0).all()):
        raise ValueError("t must be finite and > 0 (the analysis works in log t)")
    if torch.unique(tt).numel() != tt.numel():
        raise ValueError("t must not repeat a time")
    one = v.ndim == 1
    v = v[None] if one else v
    if v.ndim != 2 or v.shape[-1] != tt.numel():
        raise ValueError(f"values must have shape [N, T] or [T] with T = len(t) = {tt.numel()}, "
                         f"got {tuple(torch.as_tensor(values).shape)}")
    return v, tt, one


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width < 0:
        raise ValueError(f"width must be a finite number ≥ 0 (Gaussian width in log t), got {width!r}")
    return float(width)


def smooth_log_time(values: Tensor, t: Tensor, width: float = DEFAULT_SMOOTHING) -> Tensor:
    """Gaussian smoothing along u = log t (App. E.7): ŷ(u_i) = Σ_j g_ij y_j / Σ_j g_ij with
    g_ij = exp(−(u_i − u_j)²/(2·width²)), over the finite y_j only (NaN entries are skipped; a time with no finite
    neighbour stays NaN). Works on any grid in t (the paper's is uniform in log t). values [N, T] or [T] -> same
    shape, float64; width = 0 returns the values unchanged."""
    v, tt, one = _curves(values, t)
    width = _check_width(width)
    if width == 0:
        return v[0] if one else v
    u = tt.log()
    g = torch.exp(-((u[:, None] - u[None, :]) ** 2) / (2 * width**2))          # [T, T]
    finite = torch.isfinite(v)
    num = torch.where(finite, v, torch.zeros_like(v)) @ g.T                   # [N, T]
    den = finite.to(torch.float64) @ g.T
    out = torch.where(den > 1e-12, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    return out[0] if one else out


def log_time_derivative(values: Tensor, t: Tensor, width: float = DEFAULT_SMOOTHING) -> Tensor:
    """dξ/d log t of the Gaussian-smoothed curve (App. E.7): `smooth_log_time`, then second-order finite
    differences in u = log t (torch.gradient on the actual spacing, exact for a quadratic). values [N, T] or [T]
    -> same shape. Along the reverse process t decreases, so a correlation length that grows there has
    dξ/d log t < 0; the figures plot −dξ/d log t = dξ/d log(1/t), whose peak is the fastest growth."""
    smooth = smooth_log_time(values, t, width)
    v, tt, one = _curves(smooth, t)
    order = torch.argsort(tt)                                                  # ascending u for torch.gradient
    u = tt[order].log()
    d = torch.gradient(v[:, order], spacing=(u,), dim=-1)[0]
    out = torch.empty_like(d)
    out[:, order] = d
    return out[0] if one else out


@dataclass(frozen=True)
class Peak:
    """Where the median curve (over trajectories) of some observable peaks: time t, grid index, value there,
    and the median curve itself [T] (NaN where no trajectory has a value)."""

    t: float
    index: int
    value: float
    median: Tensor


def median_curve(values: Tensor, min_fraction: float = 0.0) -> Tensor:
    """NaN-ignoring median over trajectories; values [N, T] -> [T]. A time where fewer than
    max(1, min_fraction·N) trajectories are finite gets NaN. For an even count it is torch's median, the lower of
    the two middle values (so it is always one trajectory's value)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    v = v[None] if v.ndim == 1 else v
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must lie in [0, 1], got {min_fraction!r}")
    med = torch.nanmedian(v, dim=0).values
    count = torch.isfinite(v).sum(0)
    return torch.where(count >= max(1.0, min_fraction * v.shape[0]), med, torch.full_like(med, float("nan")))


def median_peak(values: Tensor, t: Tensor, mode: str = "max", min_fraction: float = 0.0,
                t_range: tuple[float, float] | None = None) -> Peak:
    """The time at which the median over trajectories (`median_curve`: NaN-ignoring, NaN where fewer than
    min_fraction of the trajectories are finite) of values [N, T] (or one curve [T]) is largest (mode="max") or
    smallest (mode="min"), searching only times with t_range[0] ≤ t ≤ t_range[1] when given; NaN times are
    never picked, and the earliest grid index wins a tie. Raises ValueError when no time qualifies."""
    mode = _check_choice(mode, PEAK_MODES, "mode")
    v, tt, _ = _curves(values, t)
    med = median_curve(v, min_fraction)
    ok = torch.isfinite(med)
    if t_range is not None:
        ok &= (tt >= t_range[0]) & (tt <= t_range[1])
    if not bool(ok.any()):
        raise ValueError("values: the median curve is NaN at every time searched (no trajectory has a value)")
    fill = float("-inf") if mode == "max" else float("inf")
    masked = torch.where(ok, med, torch.full_like(med, fill))
    index = int(torch.argmax(masked) if mode == "max" else torch.argmin(masked))
    return Peak(t=float(tt[index]), index=index, value=float(med[index]), median=med)


XI_EQ_MIN_FRACTION = 0.5      # ξ_eq's median counts only where at least half the trajectories have a real ξ_eq


def critical_time_from_xi_eq(xi_eq: Tensor, t: Tensor, min_fraction: float = XI_EQ_MIN_FRACTION,
                             t_range: tuple[float, float] | None = None) -> Peak:
    """The empirical critical time (App. E.12, H.3: σ_c = argmax_σ ξ_eq(σ)): the time at which the median over
    trajectories of ξ_eq(t) peaks. xi_eq [N, T], t [T]. ξ_eq is NaN where the fit has no real solution
    (λ_0 ≤ 0 or ξ_eq² ≤ 0: the drift is unstable along the uniform mode); the median is taken over the finite
    values and only where at least `min_fraction` of the trajectories have one, so that a window where most
    trajectories are unstable is not represented by the few that are not. t_range restricts the search
    (e.g. to the approach to the instability, t above `instability_window`'s entry)."""
    return median_peak(xi_eq, t, "max", min_fraction, t_range)


@dataclass(frozen=True)
class InstabilityWindow:
    """Where the median λ_0 (the drift along the uniform mode) is ≤ 0 along the reverse process: it turns
    non-positive at t_enter and positive again at t_exit (NaN when it never does); indices into the grid."""

    t_enter: float
    t_exit: float
    index_enter: int
    index_exit: int


def instability_window(lambda0: Tensor, t: Tensor) -> InstabilityWindow:
    """The first window, in the order the reverse process walks the grid t (decreasing), in which the median
    over trajectories of λ_0 [N, T] is ≤ 0: the drift is unstable (or marginal) along the uniform mode, the
    fit of ξ_eq has no real solution, and |λ_0| passes through its minimum at both ends. NaN times if the
    median never turns non-positive (or never turns back)."""
    v, tt, _ = _curves(lambda0, t)
    med = median_curve(v)
    bad = torch.nonzero(torch.isfinite(med) & (med <= 0)).flatten()
    if bad.numel() == 0:
        return InstabilityWindow(float("nan"), float("nan"), -1, -1)
    enter = int(bad[0])
    back = torch.nonzero(torch.isfinite(med[enter:]) & (med[enter:] > 0)).flatten()
    if back.numel() == 0:
        return InstabilityWindow(float(tt[enter]), float("nan"), enter, -1)
    exit_ = enter + int(back[0])
    return InstabilityWindow(float(tt[enter]), float(tt[exit_]), enter, exit_)


def rise_time(values: Tensor, t: Tensor, fraction: float = 0.5) -> Peak:
    """The first time along the reverse process (grid order, t decreasing) at which the median curve has
    covered `fraction` of its rise from its value at the first time to its value at the last: the onset of the
    growth of ξ_x. t must be the grid in the order the process walks it."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    v, tt, _ = _curves(values, t)
    med = median_curve(v)
    finite = torch.nonzero(torch.isfinite(med)).flatten()
    if finite.numel() < 2:
        raise ValueError("values: the median curve has fewer than two finite points")
    start, end = med[finite[0]], med[finite[-1]]
    level = start + fraction * (end - start)
    crossed = (med - level) * torch.sign(end - start) >= 0
    crossed &= torch.isfinite(med)
    index = int(torch.nonzero(crossed).flatten()[0])
    return Peak(t=float(tt[index]), index=index, value=float(med[index]), median=med)


# ---- critical-time theory on the schedule in use (App. A, B.6; Biroli et al. 2024) -----------------------------
#
# Every criterion below is a threshold on the noise-to-signal ratio q = σ²/α² = (1 − ᾱ)/ᾱ (the EDM / VE noise
# level squared), i.e. a target ᾱ = 1/(1 + q); the time on a schedule is t(ᾱ):
#   two-state tree level (eq. 19–22)         σ²(t_c) = α²(t_c)·|Ω|          q = |Ω|
#   spectral criterion (App. B.6, eq. 43)     σ²(t_c) = α²(t_c)·λ_max(C)     q = λ_max(C)
#   zero-field lattice instability            r(k) = 1/σ² − α²K̂(k)/σ⁴ = 0   q = max_k K̂(k)
#   speciation (Biroli et al. 2024)           ᾱ(t_s) = 1/Λ                   q = Λ − 1
# For the constant-β VP schedule ᾱ = e^{−βt}, so t = log(1 + q)/β (eq. 22: log(1+|Ω|) for β = 1).
#
# The speciation time, derived. Biroli, Bonnaire, de Bortoli & Mézard, "Dynamical regimes of diffusion
# models" (Nat. Commun. 15, 9957, 2024) run the standard Ornstein–Uhlenbeck process dx = −x dt + √2 dB,
# x_t = e^{−t}x₀ + √(1 − e^{−2t}) z, and find the speciation (symmetry-breaking) time t_S = ½ log Λ, Λ the
# largest eigenvalue of the data covariance: e^{−2t_S}·Λ = 1, the signal variance along the top principal
# direction equals the large-time noise variance 1. Their process is the VP process with ᾱ_B(t) = e^{−2t}, and
# any two VP processes pass through the same noisy marginals x = √ᾱ x₀ + √(1−ᾱ) z, one for each ᾱ (equivalently
# each signal-to-noise ratio ᾱ/(1−ᾱ)). So their t_S is, on any VP schedule, the time with
# ᾱ(t_s) = ᾱ_B(t_S) = 1/Λ (SNR 1/(Λ − 1), σ_VE² = Λ − 1); for constant β: t_s = log Λ/β (at β = 1 our time runs
# half as fast as theirs, t_s = 2·t_S). With the exact noise variance 1 − ᾱ in place of 1 the same condition
# reads ᾱ = 1/(1 + Λ), the spectral criterion: for equal Λ = λ_max the speciation time is earlier in the reverse
# process' order (smaller t) by log((1+Λ)/Λ)/β. It needs Λ > 1 (otherwise the signal never dominates).


def _noise_ratio_time(q: float, schedule: str | Schedule) -> tuple[float, float]:
    """(t, ᾱ) on `schedule` where σ²/α² = q, i.e. ᾱ = 1/(1+q); exact log1p for the constant schedule."""
    sched = _schedule(schedule)
    if not math.isfinite(q) or q <= 0:
        raise ValueError(f"the noise-to-signal threshold σ²/α² must be a positive finite number, got {q!r}")
    alpha_bar = 1.0 / (1.0 + q)
    beta = getattr(sched, "beta", None)
    if sched.name == "constant" and beta is not None:
        return math.log1p(q) / beta, alpha_bar
    return float(sched.t_from_alpha_bar(torch.tensor(alpha_bar, dtype=torch.float64))), alpha_bar


def _schedule(schedule: str | Schedule) -> Schedule:
    try:
        return get_schedule(schedule)
    except ValueError as exc:
        raise ValueError(f"schedule: {exc}") from exc


def critical_time_spectral(lam_max: float, schedule: str | Schedule = "constant") -> float:
    """t_c of the spectral criterion σ²(t_c) = α²(t_c)·λ_max(C) (App. B.6, eq. 43): ᾱ(t_c) = 1/(1 + λ_max),
    t_c = log(1 + λ_max)/β on the constant schedule. λ_max = |Ω| gives the two-state t_c (eq. 22)."""
    return _noise_ratio_time(_check_positive(lam_max, "lam_max"), schedule)[0]


def speciation_alpha_bar(data_eigenvalue: float) -> float:
    """ᾱ at the speciation time of Biroli et al. 2024 (derivation above): ᾱ(t_s) = 1/Λ, Λ > 1 the largest
    eigenvalue of the data covariance."""
    lam = _check_positive(data_eigenvalue, "data_eigenvalue")
    if lam <= 1:
        raise ValueError(f"data_eigenvalue: the speciation time needs Λ > 1 (t_S = ½ log Λ > 0), got {lam}")
    return 1.0 / lam


def speciation_time(data_eigenvalue: float, schedule: str | Schedule = "constant") -> float:
    """Biroli et al.'s t_S = ½ log Λ (standard OU process) on `schedule`: the time with ᾱ = 1/Λ; on the constant
    schedule t_s = log Λ/β (module comment above for the derivation)."""
    lam = _check_positive(data_eigenvalue, "data_eigenvalue")
    speciation_alpha_bar(lam)
    return _noise_ratio_time(lam - 1.0, schedule)[0]


def zero_field_softening_alpha_bar(response: float) -> float:
    """ᾱ at which the reverse-SDE drift b = −γx − 2γs turns soft along the uniform mode at the zero field:
    λ_0 = −γ + 2γ r(0) = 0 with r(0) = 1/σ² − ᾱK/σ⁴ (K = K̂(0): |Ω| for the two-state machine, the summed
    response kernel for a dictionary) ⇔ ᾱ² + 2Kᾱ − 1 = 0 ⇔ ᾱ = √(K²+1) − K ≈ 1/(2K). There ξ_eq (eq. 67–69)
    diverges at x = 0: λ_n/λ_0 − 1 blows up as λ_0 → 0⁺. It lies before t_c (larger t; for |Ω| = 25,
    t = 3.91 against log 26 = 3.26) because the drift's −γx term adds −γ to every mode; the probability-flow
    drift −γ(x + s) has λ_0 = −γ(1 − r), which vanishes only as ᾱ → 0."""
    k = _check_positive(response, "response")
    return 1.0 / (math.sqrt(k * k + 1.0) + k)


def _patterns_priors(patterns: Tensor, priors: Tensor | None) -> tuple[Tensor, Tensor]:
    """patterns [K, ...] -> float64 [K, C, P, P] (a [K, P, P] stack gets C = 1), priors -> normalized [K]."""
    p = torch.as_tensor(patterns, dtype=torch.float64).detach().cpu()
    if p.ndim == 3:
        p = p[:, None]
    if p.ndim != 4 or p.shape[0] < 1 or p.shape[-1] != p.shape[-2] or p.shape[-1] % 2 == 0:
        raise ValueError(f"patterns must be [K, P, P] or [K, C, P, P] with P odd, got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("patterns contain NaN or infinite values")
    k = p.shape[0]
    pri = (torch.full((k,), 1.0 / k, dtype=torch.float64) if priors is None
           else torch.as_tensor(priors, dtype=torch.float64).detach().cpu().reshape(-1))
    if pri.shape != (k,) or not bool(torch.isfinite(pri).all()) or not bool((pri > 0).all()):
        raise ValueError(f"priors must be [K] = [{k}] positive numbers")
    return p, pri / pri.sum()


def patch_covariance(patterns: Tensor, priors: Tensor | None = None) -> Tensor:
    """Covariance of the patch prior, C = Σ_k π_k (p_k − μ)(p_k − μ)ᵀ with μ = Σ_k π_k p_k (π normalized,
    default uniform); patterns [K, P, P] or [K, C, P, P] -> [D, D], D = C·P², float64. This is eq. 30 with the
    prior as weights: for a ± symmetric dictionary μ = 0, and with uniform priors over the 2M patterns ±ξ^a it
    is (1/M) Σ_a ξ^a ξ^aᵀ (each ± pair gives the same ξξᵀ)."""
    p, pri = _patterns_priors(patterns, priors)
    flat = p.reshape(p.shape[0], -1)                                            # [K, D]
    centred = flat - pri @ flat
    return centred.T @ (pri[:, None] * centred)


def patch_covariance_of_images(images: Tensor, patch_size: int, padding: str = "circular",
                               chunk: int = 256) -> Tensor:
    """Covariance [D, D] (D = C·P²) of all P×P patches of images [N, C, H, W]: wrapped at the border
    (padding="circular") or only the patches that fit inside ("valid"); streamed over chunks of images."""
    x = _check_images(images, "images")
    if padding not in ("circular", "valid"):
        raise ValueError(f"padding must be 'circular' or 'valid', got {padding!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be an odd positive int, got {patch_size!r}")
    r = patch_size // 2
    if (padding == "circular" and r > min(x.shape[-2:])) or (padding == "valid" and patch_size > min(x.shape[-2:])):
        raise ValueError(f"patch_size {patch_size} is too large for {tuple(x.shape[-2:])} images")
    d = x.shape[1] * patch_size**2
    total, outer, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
    for part in x.split(chunk):
        if padding == "circular":
            part = torch.nn.functional.pad(part, (r, r, r, r), mode="circular")
        cols = torch.nn.functional.unfold(part, patch_size)                    # [n, D, L]
        cols = cols.permute(0, 2, 1).reshape(-1, d)                             # [n·L, D]
        total += cols.sum(0)
        outer += cols.T @ cols
        count += cols.shape[0]
    mean = total / count
    return outer / count - mean[:, None] * mean[None, :]


def top_eigenvalue(matrix: Tensor) -> float:
    """λ_max of a symmetric matrix (float64 eigvalsh of its symmetric part)."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"matrix must be square, got shape {tuple(m.shape)}")
    return float(torch.linalg.eigvalsh((m + m.T) / 2)[-1])


def data_covariance_top_eigenvalue(images: Tensor, stationary: bool = False, max_dim: int = 4096) -> float:
    """Λ, the largest eigenvalue of the (1/N) sample covariance of images [N, C, H, W] (Biroli et al.'s data
    covariance).

    stationary=True: the data are translation invariant on the periodic lattice (e.g. randomly rolled fields),
    so the covariance is block-circulant and its eigenvalues are those of the C×C cross-power spectrum
    S(k) = (1/(N·HW)) Σ_n X̂_n(k) X̂_n(k)ᴴ of the fields minus their per-channel mean; this uses every sample at
    every wavevector and has no high-dimensional sampling bias. stationary=False: the full covariance of the
    C·H·W pixels minus their per-pixel mean (eigvalsh of the D×D covariance, or of the N×N Gram matrix when
    N < D; refused above D = max_dim with N ≥ D)."""
    x = _check_images(images, "images")
    n, c, h, w = x.shape
    if n < 2:
        raise ValueError("images: need at least 2 images for a covariance")
    if stationary:
        centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
        f = torch.fft.fft2(centred).permute(2, 3, 1, 0)                        # [H, W, C, N]
        spectrum = f @ f.conj().transpose(-1, -2) / (n * h * w)                 # [H, W, C, C]
        return float(torch.linalg.eigvalsh(spectrum).real.max())
    flat = x.reshape(n, -1)
    flat = flat - flat.mean(0, keepdim=True)
    d = flat.shape[1]
    if n < d:
        return top_eigenvalue(flat @ flat.T / n)
    if d > max_dim:
        raise ValueError(f"images: a {d}-pixel covariance is above max_dim={max_dim}; use stationary=True for "
                         f"translation-invariant data or fewer images than pixels (the Gram route)")
    return top_eigenvalue(flat.T @ flat / n)


def dictionary_response_kernel(patterns: Tensor, priors: Tensor | None = None) -> Tensor:
    """K(u) = Cov_π(p(0), p(u)), u over the P×P patch: the zero-field linear response of the dictionary
    machine's centre-pixel posterior mean, ∂x̂₀_i/∂x_{i+u} |_{x=0} = (α/σ²)·K(u) (eq. 54–56 differentiated; the
    weights at x = 0 are the priors). Single channel: patterns [K, P, P] or [K, 1, P, P] -> [P, P] float64."""
    p, pri = _patterns_priors(patterns, priors)
    if p.shape[1] != 1:
        raise ValueError(f"patterns: the zero-field response kernel is for one channel, got C = {p.shape[1]}")
    p = p[:, 0]                                                                 # [K, P, P]
    r = p.shape[-1] // 2
    centred = p - torch.einsum("k,kij->ij", pri, p)
    return torch.einsum("k,k,kij->ij", pri, centred[:, r, r], centred)


def zero_field_max_response(patterns: Tensor, priors: Tensor | None, lattice: tuple[int, int]) -> float:
    """max_k Re K̂(k) over the wavevectors of an H×W periodic lattice, K̂(k) = Σ_u K(u) e^{ik·u}: at x = 0 the
    machine's score Jacobian acts on e^{ik·i} as −1/σ² + α²K̂(k)/σ⁴, so its first mode turns unstable when
    σ²/α² = max_k K̂(k) (for the two-state dictionary K̂(0) = |Ω|, eq. 19)."""
    kernel = dictionary_response_kernel(patterns, priors)
    h, w = lattice
    r = kernel.shape[-1] // 2
    if h < 1 or w < 1:
        raise ValueError(f"lattice must be (H, W) of positive sizes, got {lattice!r}")
    field = torch.zeros(h, w, dtype=torch.float64)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            field[a % h, b % w] += kernel[a + r, b + r]
    return float(torch.fft.fft2(field).real.max())


TABLE_COLUMNS = ("estimate", "kind", "t", "alpha_bar", "sigma_ve", "t_over_two_state", "input", "criterion")


def critical_time_table(schedule: str | Schedule = "constant", patch_area: int | None = None,
                        patterns: Tensor | None = None, priors: Tensor | None = None,
                        lattice: tuple[int, int] | None = None, patch_cov: Tensor | None = None,
                        data_eigenvalue: float | None = None, data_name: str | None = None,
                        measured: list[tuple[str, float, str]] | None = None,
                        drift: str = "reverse_sde") -> list[dict]:
    """One row per critical-time estimate on `schedule` (columns TABLE_COLUMNS): t, ᾱ(t), σ_VE(t) = σ/α,
    t / t_c(two-state), what it was computed from and the criterion.

    Theory rows, each when its input is given: the two-state tree level t_c = t(ᾱ = 1/(1+|Ω|)) (patch_area, eq.
    20–22); for a dictionary (patterns, priors) the spectral criterion on its patch covariance (eq. 43), the
    speciation time with Λ = λ_max(C), and with `lattice` the zero-field instability of the machine on that
    lattice; for a patch covariance of data patches (patch_cov) the spectral criterion on it; for the largest
    eigenvalue Λ of the data covariance (data_eigenvalue) Biroli et al.'s speciation time. With
    drift="reverse_sde" also the zero-field divergence of ξ_eq (`zero_field_softening_alpha_bar`) for the
    two-state machine and the dictionary. measured: rows (name, t, how) from trajectories (empirical t_c =
    argmax of the median ξ_eq, peak times, ...)."""
    sched = _schedule(schedule)
    drift = _check_choice(drift, DRIFTS, "drift")
    two_state_t = None
    if patch_area is not None:
        two_state_t = _noise_ratio_time(float(_check_area(patch_area)), sched)[0]
    rows: list[dict] = []

    def add(name: str, kind: str, t: float, input_: str, criterion: str) -> None:
        tt = torch.tensor(t, dtype=torch.float64)
        ab = float(sched.alpha_bar(tt)) if math.isfinite(t) else float("nan")
        rows.append({"estimate": name, "kind": kind, "t": t, "alpha_bar": ab,
                     "sigma_ve": math.sqrt((1 - ab) / ab) if 0 < ab <= 1 else float("nan"),
                     "t_over_two_state": t / two_state_t if two_state_t else float("nan"),
                     "input": input_, "criterion": criterion})

    if patch_area is not None:
        add("two-state tree level (App. A)", "theory", two_state_t, f"|Ω| = {patch_area}",
            "r(t_c) = 0: α²(t_c) = 1/(1+|Ω|), eq. 20–22")
        if drift == "reverse_sde":
            a = zero_field_softening_alpha_bar(float(patch_area))
            add("ξ_eq divergence at the zero field, two-state (drift λ_0 = 0)", "theory",
                _noise_ratio_time((1 - a) / a, sched)[0], f"K̂(0) = |Ω| = {patch_area}",
                "−γ + 2γ r(0) = 0: ᾱ = √(K²+1) − K")
    if patterns is not None:
        cov = patch_covariance(patterns, priors)
        lam = top_eigenvalue(cov)
        add("spectral criterion, dictionary patch covariance (App. B.6)", "theory",
            _noise_ratio_time(lam, sched)[0], f"λ_max(C) = {lam:.4g}", "σ²(t_c) = α²(t_c)·λ_max(C), eq. 43")
        if lattice is not None:
            kmax = zero_field_max_response(patterns, priors, lattice)
            if kmax > 0:
                add("zero-field lattice instability of the dictionary machine", "theory",
                    _noise_ratio_time(kmax, sched)[0], f"max_k K̂(k) = {kmax:.4g} on {lattice[0]}×{lattice[1]}",
                    "r(k) = 1/σ² − α²K̂(k)/σ⁴ = 0 at the zero field")
            k0 = float(dictionary_response_kernel(patterns, priors).sum())
            if drift == "reverse_sde" and k0 > 0:
                a = zero_field_softening_alpha_bar(k0)
                add("ξ_eq divergence at the zero field, dictionary (drift λ_0 = 0)", "theory",
                    _noise_ratio_time((1 - a) / a, sched)[0], f"K̂(0) = {k0:.4g}",
                    "−γ + 2γ r(0) = 0: ᾱ = √(K²+1) − K")
        if lam > 1:
            add("speciation (Biroli et al. 2024), patch covariance", "theory", speciation_time(lam, sched),
                f"Λ = λ_max(C) = {lam:.4g}", "ᾱ(t_s) = 1/Λ (t_S = ½ log Λ on the standard OU process)")
    if patch_cov is not None:
        lam = top_eigenvalue(patch_cov)
        add("spectral criterion, covariance of the data's patches", "theory", _noise_ratio_time(lam, sched)[0],
            f"λ_max(C) = {lam:.4g} (D = {patch_cov.shape[0]} patch values)" + (f" ({data_name})" if data_name else ""),
            "σ²(t_c) = α²(t_c)·λ_max(C), eq. 43")
    if data_eigenvalue is not None and data_eigenvalue > 1:
        add("speciation (Biroli et al. 2024), data covariance", "theory", speciation_time(data_eigenvalue, sched),
            f"Λ = {data_eigenvalue:.4g}" + (f" ({data_name})" if data_name else ""),
            "ᾱ(t_s) = 1/Λ (t_S = ½ log Λ on the standard OU process)")
    for name, t, how in measured or []:
        add(name, "measured", float(t), "trajectories", how)
    return rows


def _check_area(patch_area: int) -> int:
    if isinstance(patch_area, bool) or not isinstance(patch_area, int) or patch_area < 1:
        raise ValueError(f"patch_area must be a positive int |Ω|, got {patch_area!r}")
    return patch_area


# ---- the dictionary machine as convolutions -------------------------------------------------------------------

MIN_NOISE_VARIANCE = 1e-10    # as the machine (engine.posterior): ᾱ = 1 means the nearest pattern


class PatchDictionaryDenoiser:
    """The `dictionary` machine's x̂₀ (criticality App. E.4, eq. 54–57) computed as convolutions: at site i
    with patch y_i (wrapped, or zero-extended for padding="zeros"), log w_k = log π_k + (α/σ²)⟨p_k, y_i⟩ −
    (α²/2σ²)‖p_k‖² + const (the Gaussian posterior N(y | α p_k, σ²I); for ±1 patterns the last term is a constant,
    eq. 54), ⟨p_k, y_i⟩ for all i at once as a cross-correlation (F.conv2d), and x̂₀_i = Σ_k w_k p_k(0) (eq. 56).
    Float64 by default, differentiable (exact JVPs). Same numbers as the machine to rounding (tested), at a
    fraction of the cost on a CPU: the 80×80 reproduction of App. E uses it. Callable as model(x, ᾱ[, labels])."""

    name = "dictionary"

    def __init__(self, patterns: Tensor, priors: Tensor | None = None,
                 image_shape: tuple[int, int, int] | None = None, padding: str = "circular",
                 dtype: torch.dtype = torch.float64) -> None:
        p, pri = _patterns_priors(patterns, priors)
        if padding not in ("circular", "zeros"):
            raise ValueError(f"padding must be 'circular' or 'zeros', got {padding!r}")
        self.patterns, self.priors, self.padding, self.dtype = p.to(dtype), pri, padding, dtype
        self.log_prior = pri.log().to(dtype)                                    # [K]
        self.sq_norm = (p**2).flatten(1).sum(1).to(dtype)                       # [K]
        r = p.shape[-1] // 2
        self.centre = p[:, :, r, r].to(dtype)                                   # [K, C]
        self.patch_size = p.shape[-1]
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.config = {"name": "dictionary", "route": "convolution", "padding": padding,
                       "patch_size": self.patch_size}

    @classmethod
    def from_machine(cls, machine: object) -> PatchDictionaryDenoiser:
        """The convolutional form of a `dictionary` machine built from explicit patterns (its bank holds one
        key per pattern, log-priors in float32 as the machine uses them)."""
        bank = getattr(machine, "bank", None)
        if getattr(machine, "name", None) != "dictionary" or bank is None or bank.groups != 1:
            raise ValueError("machine must be a `dictionary` machine (sf.models.make('dictionary', ...))")
        c, size = machine.image_shape[0], machine.patch_size
        patterns = bank.keys[0].to(torch.float64).cpu().reshape(-1, c, size, size)
        priors = bank.logw[0].to(torch.float64).cpu().exp()
        return cls(patterns, priors, image_shape=machine.image_shape, padding=machine.padding)

    def __call__(self, x: Tensor, alpha_bar: Tensor | float, labels: Tensor | None = None) -> Tensor:
        if labels is not None:
            raise ValueError("labels: the dictionary model has no classes")
        if x.ndim != 4 or x.shape[1] != self.patterns.shape[1]:
            raise ValueError(f"x must be [B, {self.patterns.shape[1]}, H, W], got {tuple(x.shape)}")
        r = self.patch_size // 2
        if self.padding == "circular" and r > min(x.shape[-2:]):
            raise ValueError(f"x: a {self.patch_size}×{self.patch_size} patch wraps more than once around "
                             f"{tuple(x.shape[-2:])}")
        dev = x.device
        z = x.to(self.dtype)
        ab = torch.as_tensor(alpha_bar, dtype=self.dtype, device=dev).reshape(-1).expand(x.shape[0])
        a = ab.sqrt()[:, None, None, None]
        s2 = (1 - ab).clamp_min(MIN_NOISE_VARIANCE)[:, None, None, None]
        mode = "circular" if self.padding == "circular" else "constant"
        dots = torch.nn.functional.conv2d(torch.nn.functional.pad(z, (r, r, r, r), mode=mode),
                                          self.patterns.to(dev))                # [B, K, H, W]
        logits = (self.log_prior.to(dev)[None, :, None, None] + (a / s2) * dots
                  - (a * a / (2 * s2)) * self.sq_norm.to(dev)[None, :, None, None])
        w = torch.softmax(logits, dim=1)
        return torch.einsum("bkhw,kc->bchw", w, self.centre.to(dev)).to(x.dtype)
