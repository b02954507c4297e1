"""Per-component schedules of the component-wise forward processes (rg-diffusion-slides.txt, "Information
Erasure: Component-wise schedules").

A variance-preserving component process (slides, "Forward process")

    dφ = −½ U β(t) U† φ dt + U √β(t) S U† dw,     β = diag(β_k(t)),  S = diag(S_k)

is, per component c_k = (U†φ)_k, the Ornstein–Uhlenbeck process dc_k = −½ β_k c_k dt + √β_k S_k dw_k with the exact
marginal

    c_k(t) | c_k(0) ~ N(√ᾱ_k(t) c_k(0), S_k² (1 − ᾱ_k(t))),      ᾱ_k(t) = exp(−∫₀ᵗ β_k),

so a schedule is ᾱ_k(t) [T, D] (β_k = −d log ᾱ_k/dt ≥ 0 whenever ᾱ_k decreases). Schedules here:

- `equal`: ᾱ_k(t) = ᾱ(t) of a toolkit schedule (`scorefield.schedules`, cosine by default) for every k: with S = I
  this is the toolkit's standard VP diffusion, coefficient for coefficient.
- `rg-cutoff`: the Polchinski cutoff kernel K_Λ(k) = σ((Λ − |k|)/w) as the fraction of each component's signal
  variance that survives, on top of the base schedule:

      ᾱ_k(t) = ᾱ(t) · K_{Λ(t)}(|k|) / K_{Λ(0)}(|k|),     Λ(t) = k_max + w − t̂ (k_max − k_min + 2w),  t̂ ∈ [0, 1],

  so the cutoff Λ sweeps linearly from above the highest |k| to below the lowest, erasing high |k| first, while
  ᾱ(t) (cosine) still takes every component to pure noise at the end. ᾱ_k(0) = 1 and ᾱ_k = 0 wherever ᾱ = 0,
  exactly. The knob is `spread` = (k_max − k_min)/w, the sharpness of the cutoff in units of the |k| range:
  spread = 0 is K ≡ 1, standard diffusion (all components at once); as it grows the high |k| are erased earlier.
  It cannot reach "autoregressive": ᾱ_k ≤ ᾱ(t), so the base factor erases every component by t ≈ 0.5–0.7 whatever
  the cutoff, and the knob only orders the upper half of the |k| range (`scale-by-scale` below reaches it).
  This is the structure of blurring diffusion (a global VP factor times a per-frequency attenuation)
  with the RG sigmoid in place of the heat kernel. (A constant log-SNR offset per component, ᾱ_k = σ(logit ᾱ +
  shift_k), was tried first: it pushes the low-|k| components' whole transition into the first sampler step from
  t = 1, where ε-prediction error is amplified by 1/√ᾱ_k, and trained networks' samples diverged.)

- `scale-by-scale`: each shell of |k| (`Basis.shells`: integer |k| shells, Haar levels) runs the base schedule on its
  own time window, the finest shell first:

      ᾱ_k(t) = ᾱ(τ_k(t)),   τ_k = t_min + (t_max − t_min)·clamp((u − a_k)/L, 0, 1),   u = (t − t_min)/(t_max − t_min),
      a_k = p·r_k/S,  L = 1 − p + p/S,

  with S shells, r_k = S − 1 − shell_k the shell's place in the order (0: highest |k|) and p = `spread` ∈ [0, 1].
  p = 0 is every window [0, 1]: the equal schedule, bit for bit. p = 1 is S disjoint consecutive windows of
  length 1/S ("autoregressive"): a shell's noising starts when the previous (finer) shell has reached the base
  schedule's end ᾱ(t_max) (3.7e-33 for the cosine), so at any t at most one shell is partially noised — the
  generation order of wavelet score models, coarsest first. In between the windows overlap by 1 − p of their
  length. τ_k is non-decreasing in t, so β_k = −d log ᾱ_k/dt ≥ 0 (a forward OU process; β_k = 0 outside the
  window), the marginals stay those of eq. (2) exactly, and ᾱ_k(t_max) = ᾱ(t_max) for every k and p: the process
  ends at the same Gaussian N(0, S²) (white or matched) as the equal schedule.

Non-variance-preserving members of the same diagonal family dc_k = a_k(t) c_k dt + g_k(t) dw_k (the slides'
"simultaneously diagonalizable" form) are given directly by their mean factor m_k(t) and variance v_k(t):
`heat_dissipation_coefficients` (Rissanen et al. 2023) and `blurring_coefficients` (Hoogeboom & Salimans 2023).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..options import closest
from ..schedules import Schedule, get_schedule

Tensor = torch.Tensor

COMPONENT_SCHEDULES = ("equal", "rg-cutoff", "scale-by-scale")
DEFAULT_SPREAD = 8.0
DEFAULT_SHELL_SPREAD = 1.0       # scale-by-scale: autoregressive


class ScheduleError(ValueError):
    """An unknown per-component schedule or an invalid option."""


class ComponentSchedule:
    """ᾱ_k(t) [T, D] on the base schedule's time range."""

    name = "component"

    def __init__(self, base: str | Schedule = "cosine") -> None:
        self.base = get_schedule(base)
        if not isinstance(base, str):
            base = self.base.name
        self.base_name = str(base)
        self.t_min, self.t_max = float(self.base.t_min), float(self.base.t_max)

    def alpha_bar(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def base_alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ(t) of the base schedule, [T] float64 in [0, 1]."""
        return self.base.alpha_bar(torch.as_tensor(t, dtype=torch.float64)).clamp(0.0, 1.0)

    @property
    def equal(self) -> bool:
        """True when ᾱ_k(t) = ᾱ(t) for every component (the standard process's schedule)."""
        return False

    def ode_t_start(self, alpha_bar_start: Tensor) -> float:
        """The earliest time at which every component's ᾱ_k is at most `alpha_bar_start` [] (where the
        probability-flow samplers start)."""
        return float(self.base.t_from_alpha_bar(alpha_bar_start))

    def spec(self) -> dict[str, Any]:
        return {"schedule": self.name, "base": self.base_name}


class EqualSchedule(ComponentSchedule):
    """ᾱ_k(t) = ᾱ(t) for every component: the standard VP diffusion of `scorefield.schedules`."""

    name = "equal"

    def __init__(self, dim: int, base: str | Schedule = "cosine") -> None:
        super().__init__(base)
        self.dim = int(dim)

    @property
    def equal(self) -> bool:
        return True

    def alpha_bar(self, t: Tensor) -> Tensor:
        ab = self.base_alpha_bar(t).reshape(-1, 1)                   # [T, 1]
        return ab.expand(ab.shape[0], self.dim)


class RGCutoffSchedule(ComponentSchedule):
    """ᾱ_k(t) = ᾱ(t)·K_{Λ(t)}(|k|)/K_{Λ(0)}(|k|), K_Λ(k) = σ((Λ − k)/w), w = (k_max − k_min)/spread (see the
    module docstring)."""

    name = "rg-cutoff"

    def __init__(self, k_abs: Tensor, spread: float = DEFAULT_SPREAD, base: str | Schedule = "cosine") -> None:
        super().__init__(base)
        spread = float(spread)
        if not math.isfinite(spread) or spread < 0:
            raise ScheduleError(f"spread (the sharpness of the cutoff in units of the |k| range) must be a finite "
                                f"number ≥ 0, got {spread}")
        self.spread = spread
        self.k = torch.as_tensor(k_abs, dtype=torch.float64)
        self.k_min, self.k_max = float(self.k.min()), float(self.k.max())
        span = self.k_max - self.k_min
        self.width = span / spread if spread > 0 and span > 0 else math.inf

    def cutoff(self, t: Tensor) -> Tensor:
        """Λ(t) [T]: linear from k_max + w (t = t_min) to k_min − w (t = t_max)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        u = (t - self.t_min) / (self.t_max - self.t_min)
        return self.k_max + self.width - u * (self.k_max - self.k_min + 2 * self.width)

    def kept(self, t: Tensor) -> Tensor:
        """K_{Λ(t)}(|k|)/K_{Λ(0)}(|k|) [T, D]: the fraction of each component's signal variance the cutoff keeps."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if not math.isfinite(self.width):
            return torch.ones(t.shape[0], self.k.shape[0], dtype=torch.float64)
        lam = self.cutoff(t)[:, None]
        lam0 = self.k_max + self.width
        # log σ(a) − log σ(b), stable for large negative a
        return torch.exp(torch.nn.functional.logsigmoid((lam - self.k[None, :]) / self.width)
                         - torch.nn.functional.logsigmoid((lam0 - self.k[None, :]) / self.width))

    def alpha_bar(self, t: Tensor) -> Tensor:
        ab = self.base_alpha_bar(t).reshape(-1, 1)                   # [T, 1]
        return ab * self.kept(t)

    @property
    def equal(self) -> bool:
        return not math.isfinite(self.width)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "spread": self.spread}


class ScaleByScaleSchedule(ComponentSchedule):
    """ᾱ_k(t) = ᾱ(τ_k(t)): the base schedule run on one time window per shell of |k|, finest first; `spread` p ∈
    [0, 1] from all at once (p = 0, the equal schedule) to one shell after another (p = 1) (module docstring)."""

    name = "scale-by-scale"

    def __init__(self, shells: Tensor, spread: float = DEFAULT_SHELL_SPREAD, base: str | Schedule = "cosine") -> None:
        super().__init__(base)
        spread = float(spread)
        if not math.isfinite(spread) or not 0.0 <= spread <= 1.0:
            raise ScheduleError(f"spread of the scale-by-scale schedule (0: all shells at once, 1: one after "
                                f"another) must lie in [0, 1], got {spread}")
        self.spread = spread
        self.shells = torch.as_tensor(shells).to(torch.int64).reshape(-1)             # [D], 0 = lowest |k|
        self.dim = int(self.shells.numel())
        self.n_shells = int(self.shells.max()) + 1 if self.dim else 0
        S = self.n_shells
        rank = (S - 1 - self.shells).to(torch.float64)                                 # 0: erased first
        self.start = spread * rank / S                                                 # a_k [D], in u units
        self.length = 1.0 - spread + spread / S                                        # L

    @property
    def equal(self) -> bool:
        return self.spread == 0 or self.n_shells <= 1

    def window(self, shell: int) -> tuple[float, float]:
        """(start, end) process times of the window in which `shell` is noised."""
        a = self.spread * (self.n_shells - 1 - int(shell)) / self.n_shells
        span = self.t_max - self.t_min
        return self.t_min + a * span, self.t_min + (a + self.length) * span

    def local_time(self, t: Tensor) -> Tensor:
        """τ_k(t) [T, D]: each component's time on the base schedule."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        span = self.t_max - self.t_min
        u = (t - self.t_min) / span                                                     # [T]
        local = ((u[:, None] - self.start[None, :]) / self.length).clamp(0.0, 1.0)      # [T, D]
        return self.t_min + local * span

    def alpha_bar(self, t: Tensor) -> Tensor:
        if self.equal:                                         # the equal schedule's arithmetic: bit for bit
            ab = self.base_alpha_bar(t).reshape(-1, 1)
            return ab.expand(ab.shape[0], self.dim)
        tau = self.local_time(t)
        return self.base_alpha_bar(tau.reshape(-1)).reshape(tau.shape)

    def ode_t_start(self, alpha_bar_start: Tensor) -> float:
        """The coarsest shell's window (the last one) is where the base point falls latest."""
        tb = super().ode_t_start(alpha_bar_start)
        if self.equal:
            return tb
        span = self.t_max - self.t_min
        last = self.spread * (self.n_shells - 1) / self.n_shells
        return self.t_min + (last + self.length * (tb - self.t_min) / span) * span

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "spread": self.spread}


def shell_indices(k_abs: Tensor) -> Tensor:
    """The shell of each component [D] int64, 0 = lowest: the rank of its |k| rounded to an integer (the shells of
    the radially averaged power spectrum)."""
    return torch.unique(torch.as_tensor(k_abs, dtype=torch.float64).round(), return_inverse=True)[1]


def make_component_schedule(name: str, k_abs: Tensor, base: str | Schedule = "cosine",
                            spread: float | None = None, shells: Tensor | None = None) -> ComponentSchedule:
    """The per-component schedule `name` for components of |k| `k_abs` [D] (and shells [D], default
    `shell_indices(k_abs)`, for scale-by-scale)."""
    if name not in COMPONENT_SCHEDULES:
        raise ScheduleError(f"unknown component schedule '{name}'{closest(str(name), COMPONENT_SCHEDULES)}; "
                            f"available: {', '.join(COMPONENT_SCHEDULES)}")
    if name == "equal":
        if spread not in (None, 0, 0.0):
            raise ScheduleError("spread applies to schedule='rg-cutoff' or 'scale-by-scale' (the equal schedule "
                                "has spread 0)")
        return EqualSchedule(len(k_abs), base)
    if name == "scale-by-scale":
        return ScaleByScaleSchedule(shell_indices(k_abs) if shells is None else shells,
                                    DEFAULT_SHELL_SPREAD if spread is None else spread, base)
    return RGCutoffSchedule(k_abs, DEFAULT_SPREAD if spread is None else spread, base)


# ---- the presets' coefficients (mean factor and variance per component) --------------------------------------

def heat_blur_sigma(t: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """IHD's blur width σ_B(t) = σ_min^(1−t) σ_max^t for t > 0 (their log-spaced levels: level k ≥ 1 of K ↔
    t = (k−1)/(K−1), level 1 the limit t → 0⁺) and σ_B(0) = 0 (their level 0, the data): like IHD's last step from
    level 1 to level 0, the process jumps at t = 0."""
    t = torch.as_tensor(t, dtype=torch.float64)
    sigma = torch.exp(math.log(sigma_min) + t * (math.log(sigma_max) - math.log(sigma_min)))
    return torch.where(t > 0, sigma, torch.zeros_like(sigma))


def heat_dissipation_coefficients(t: Tensor, frequencies_squared: Tensor, sigma_min: float, sigma_max: float,
                                  noise: float) -> tuple[Tensor, Tensor]:
    """Inverse heat dissipation (Rissanen, Heinonen & Solin 2023, eq. 4–5 and their DCTBlur): per DCT component
    m_k(t) = exp(−λ_k τ(t)), τ = σ_B(t)²/2, λ_k = frequencies_squared, and a constant variance σ² (`noise`) for
    t > 0 (0 at t = 0: the data). Returns (m [T, D], v [T, D])."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    tau = heat_blur_sigma(t, sigma_min, sigma_max) ** 2 / 2                 # [T]
    m = torch.exp(-tau[:, None] * frequencies_squared[None, :])
    v = torch.where(t[:, None] > 0, torch.full_like(m, noise**2), torch.zeros_like(m))
    return m, v


def blurring_noise_scaling(t: Tensor, logsnr_min: float = -10.0, logsnr_max: float = 10.0) -> Tensor:
    """ᾱ_t = α_t² of blurring diffusion's truncated cosine schedule (Hoogeboom & Salimans 2023, App. A,
    get_noise_scaling_cosine): log SNR(t) = −2 log tan(a t + b), b = arctan(e^{−log SNR_max/2}),
    a = arctan(e^{−log SNR_min/2}) − b, so log SNR runs from logsnr_max at t = 0 to logsnr_min at t = 1;
    ᾱ = σ(log SNR)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    logsnr = -2 * torch.log(torch.tan(a * t + b))
    return torch.sigmoid(logsnr)


def blurring_coefficients(t: Tensor, frequencies_squared: Tensor, sigma_blur_max: float, min_scale: float,
                          logsnr_min: float = -10.0, logsnr_max: float = 10.0) -> tuple[Tensor, Tensor]:
    """Blurring diffusion (Hoogeboom & Salimans 2023, Sec. 3–4 and App. A): q(z_t | x) = N(α_t V D_t Vᵀ x, σ_t² I)
    with V the DCT, D_t = diag(d_t), d_t = (1 − d_min)·exp(−λ τ_t) + d_min (d_min = `min_scale`), τ_t = σ_B(t)²/2,
    σ_B(t) = σ_B,max·sin²(πt/2), λ = (πp/H)² + (πq/W)², and α_t² = 1 − σ_t² of `blurring_noise_scaling`.
    Returns (m = α_t d_t [T, D], v = σ_t² [T, D])."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    sigma_blur = sigma_blur_max * torch.sin(t * math.pi / 2) ** 2
    tau = sigma_blur**2 / 2                                                 # [T]
    d = (1 - min_scale) * torch.exp(-tau[:, None] * frequencies_squared[None, :]) + min_scale
    ab = blurring_noise_scaling(t, logsnr_min, logsnr_max)[:, None]
    return ab.sqrt() * d, (1 - ab).expand_as(d).clone()
