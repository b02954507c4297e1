"""Noise schedules ᾱ(t) of the VP forward process and the time grids samplers walk.

The forward process is the Ornstein–Uhlenbeck flow dφ = −γ_t φ dt + √(2γ_t) dW (kamb-ganguli eq. 18),
whose marginals are φ_t = √ᾱ_t φ₀ + √(1−ᾱ_t) η (eq. 20) with ᾱ_t = exp(−2∫₀ᵗ γ) (eq. 21), so
γ_t = −½ d log ᾱ_t / dt. Every schedule gives ᾱ(t), its inverse t(ᾱ), and γ(t); α = √ᾱ, σ = √(1−ᾱ), and
the variance-exploding noise level σ_VE = σ/α (EDM's σ) follow from ᾱ.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .options import closest

Tensor = torch.Tensor


class ScheduleError(ValueError):
    """An unknown schedule or time grid, or an out-of-range time."""


class Schedule:
    """Base: subclasses define `alpha_bar(t)`, `t_from_alpha_bar(ab)` and `gamma(t)` on [t_min, t_max]."""

    name = "schedule"
    t_min = 0.0
    t_max = 1.0

    def alpha_bar(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gamma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Drift coefficient γ_t = −½ d log ᾱ/dt (kamb-ganguli eq. 18, 21)."""
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale α = √ᾱ."""
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale σ = √(1−ᾱ) of the VP process."""
        return (1 - self.alpha_bar(t)).clamp_min(0).sqrt()

    def sigma_ve(self, t: Tensor) -> Tensor:
        """EDM / VE noise level σ_VE = √((1−ᾱ)/ᾱ), i.e. ᾱ = 1/(1+σ_VE²)."""
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).clamp_min(0).sqrt()

    def t_from_sigma_ve(self, sigma: Tensor) -> Tensor:
        return self.t_from_alpha_bar(alpha_bar_from_sigma_ve(sigma))

    def _t(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        return t

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t in [{self.t_min}, {self.t_max}])"


def alpha_bar_from_sigma_ve(sigma: Tensor) -> Tensor:
    """ᾱ = 1/(1+σ²): the VP ᾱ of an EDM / VE noise level σ."""
    return 1.0 / (1.0 + torch.as_tensor(sigma) ** 2)


class CosineSchedule(Schedule):
    """Cosine schedule of Nichol & Dhariwal: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t+s)/(1+s))·π/2), t ∈ [0, 1]."""

    name = "cosine"

    def __init__(self, s: float = 0.008) -> None:
        self.s = s
        self._f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def _u(self, t: Tensor) -> Tensor:
        return (self._t(t) + self.s) / (1 + self.s) * (math.pi / 2)

    def alpha_bar(self, t: Tensor) -> Tensor:
        return (torch.cos(self._u(t)) ** 2 / self._f0).clamp(0.0, 1.0)

    def t_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:
        ab = torch.as_tensor(alpha_bar).clamp(0.0, 1.0)
        return torch.arccos((ab * self._f0).sqrt()) * (2 / math.pi) * (1 + self.s) - self.s

    def gamma(self, t: Tensor) -> Tensor:
        # −½ d/dt log cos²(u) = tan(u)·du/dt
        return torch.tan(self._u(t)) * (math.pi / 2) / (1 + self.s)


class LinearVPSchedule(Schedule):
    """DDPM's linear β in continuous time (Song et al.): β(t) = β_min + t(β_max − β_min), t ∈ [0, 1],
    ᾱ(t) = exp(−β_min t − ½(β_max − β_min) t²), γ = β/2. Defaults β_min = 0.1, β_max = 20 match DDPM's
    1000 steps of β from 1e-4 to 0.02."""

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min, self.beta_max = beta_min, beta_max

    def alpha_bar(self, t: Tensor) -> Tensor:
        t = self._t(t)
        return torch.exp(-(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2))

    def t_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:
        # solve ½ d t² + β_min t − L = 0 with L = −log ᾱ, d = β_max − β_min
        L = -torch.log(torch.as_tensor(alpha_bar).clamp_min(1e-300))
        d = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * L)) / d

    def gamma(self, t: Tensor) -> Tensor:
        return 0.5 * (self.beta_min + self._t(t) * (self.beta_max - self.beta_min))


class ConstantVPSchedule(Schedule):
    """Constant-β VP (ambrogioni criticality paper): α(t) = e^{−βt/2}, σ² = 1 − e^{−βt}, γ = β/2,
    t ∈ [0, T] with T = 50 by default (their App. E.5)."""

    name = "constant"

    def __init__(self, beta: float = 1.0, t_max: float = 50.0) -> None:
        self.beta = beta
        self.t_max = t_max

    def alpha_bar(self, t: Tensor) -> Tensor:
        return torch.exp(-self.beta * self._t(t))

    def t_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:
        return -torch.log(torch.as_tensor(alpha_bar).clamp_min(1e-300)) / self.beta

    def gamma(self, t: Tensor) -> Tensor:
        return torch.full_like(self._t(t), 0.5 * self.beta)


class EDMSchedule(Schedule):
    """EDM / VE noise levels, time t = σ_VE ∈ [σ_min, σ_max] (Karras et al.): ᾱ = 1/(1+σ²),
    γ = −½ d log ᾱ/dσ = σ/(1+σ²)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha_bar(self, t: Tensor) -> Tensor:
        return alpha_bar_from_sigma_ve(self._t(t))

    def t_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:
        ab = torch.as_tensor(alpha_bar)
        return ((1 - ab) / ab).clamp_min(0).sqrt()

    def gamma(self, t: Tensor) -> Tensor:
        t = self._t(t)
        return t / (1 + t**2)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "cosine": CosineSchedule, "linear": LinearVPSchedule, "constant": ConstantVPSchedule, "edm": EDMSchedule,
}


def get_schedule(schedule: str | Schedule, **options: float) -> Schedule:
    """A Schedule from its name ('cosine', 'linear', 'constant', 'edm') or the Schedule itself."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule '{schedule}'{closest(str(schedule), SCHEDULES)}; "
                            f"available: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[schedule](**options)


# ---- time grids: descending times t_0 = t_start > t_1 > ... > t_n = t_end ---------------------------------

def uniform_grid(steps: int, t_start: float, t_end: float) -> Tensor:
    """steps+1 equally spaced times from t_start down to t_end."""
    _check_steps(steps)
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def log_grid(steps: int, t_start: float, t_end: float) -> Tensor:
    """Logarithmic grid t_k = exp(log T + (k/N)(log t_min − log T)) (criticality paper eq. 59)."""
    _check_steps(steps)
    if t_start <= 0 or t_end <= 0:
        raise ScheduleError(f"a logarithmic grid needs positive times, got {t_start} → {t_end}")
    k = torch.arange(steps + 1, dtype=torch.float64)
    return torch.exp(math.log(t_start) + k / steps * (math.log(t_end) - math.log(t_start)))


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (EDM eq. 5) noise levels σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, n = steps."""
    _check_steps(steps)
    i = torch.arange(steps, dtype=torch.float64)
    denom = max(steps - 1, 1)
    return (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def karras_grid(steps: int, schedule: Schedule, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> Tensor:
    """Karras ρ-spaced σ_VE levels mapped to the schedule's times, then a final t = t_min (ᾱ = 1 side)."""
    sig = karras_sigmas(steps, sigma_min, sigma_max, rho)
    t = schedule.t_from_sigma_ve(sig).to(torch.float64)
    t = t.clamp(schedule.t_min, schedule.t_max)
    return torch.cat([t, torch.tensor([schedule.t_min], dtype=torch.float64)])


GRIDS = ("uniform", "log", "karras")


def time_grid(schedule: Schedule, steps: int, grid: str = "uniform", t_start: float | None = None,
              t_end: float | None = None) -> Tensor:
    """Descending times [steps+1] for `schedule`: uniform, logarithmic (eq. 59) or Karras ρ = 7."""
    t_start = schedule.t_max if t_start is None else t_start
    t_end = schedule.t_min if t_end is None else t_end
    if grid == "uniform":
        return uniform_grid(steps, t_start, t_end)
    if grid == "log":
        return log_grid(steps, t_start, max(t_end, 1e-3))
    if grid == "karras":
        return karras_grid(steps, schedule)
    raise ScheduleError(f"unknown time grid '{grid}'; available: {', '.join(GRIDS)}")


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise ScheduleError(f"steps must be a positive integer, got {steps}")
