"""Any scorefield denoiser as a k-diffusion model, so that k-diffusion's samplers run it.

k-diffusion's samplers (`k_diffusion.sampling.sample_euler`, `sample_heun`, `sample_dpmpp_2m`, …) call
`model(x, sigma * s_in, **extra_args)` with the variance-exploding state x = x₀ + σ·n and σ [B], and expect
the denoised x̂₀ back (its `Denoiser` / `DiscreteEpsDDPMDenoiser` wrappers). With ᾱ = 1/(1+σ²) the VP state of
the call convention is √ᾱ·x (EDM eq. 4 with s = √ᾱ, DESIGN's "x_vp = x_ve·√ᾱ"), so

    k_model(x, σ) = model(√ᾱ·x, ᾱ),   ᾱ = 1/(1+σ²)

exactly, for any σ ≥ 0 (σ = 0 is ᾱ = 1, the noiseless state). Like k-diffusion's wrappers of discrete models
(`DiscreteSchedule`), the wrapper also carries a σ table laid out on a schedule's time, `sigmas` (increasing),
`sigma_min` / `sigma_max`, `get_sigmas(n)` (n levels uniform in that time, then 0) and `sigma_to_t` /
`t_to_sigma`. The time here is the scorefield schedule's own time t (not a table index) and the table only
spaces the levels: the denoiser's conversion above does not depend on it. σ_max is capped at 80 (EDM's
σ_max, where the toolkit's ODE samplers start): a cosine schedule reaches ᾱ = 0, σ = ∞, at t = 1.
"""
from __future__ import annotations

from typing import Any

import torch

from ...sampling import SIGMA_VE_START
from ...schedules import Schedule, get_schedule
from ..base import Denoiser
from .errors import AdapterError

TABLE_SIZE = 1000


class KDiffusionModel(torch.nn.Module):
    """A scorefield denoiser behind k-diffusion's model call (module docstring). Build it with
    `to_k_diffusion(model)`. `inner_model` is the scorefield denoiser, as in k-diffusion's wrappers."""

    label_kwarg = "labels"   # k-diffusion passes extra_args as keywords: extra_args={"labels": y}

    def __init__(self, model: Denoiser, schedule: str | Schedule = "cosine", sigma_max: float = SIGMA_VE_START,
                 table_size: int = TABLE_SIZE) -> None:
        super().__init__()
        if not isinstance(model, Denoiser):
            raise AdapterError(f"to_k_diffusion: model must be a scorefield Denoiser, got {type(model).__name__}")
        if isinstance(table_size, bool) or int(table_size) != table_size or table_size < 2:
            raise AdapterError(f"to_k_diffusion: table_size must be an integer ≥ 2, got {table_size!r}")
        if not 0 < float(sigma_max) < float("inf"):
            raise AdapterError(f"to_k_diffusion: sigma_max must be positive and finite, got {sigma_max!r}")
        try:
            self.schedule = get_schedule(schedule)
        except ValueError as exc:
            raise AdapterError(f"to_k_diffusion: {exc}") from None
        self.inner_model = model
        times = _table_times(self.schedule, float(sigma_max), int(table_size))
        self.register_buffer("sigmas", self.schedule.sigma_ve(times).to(torch.float32), persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    # ---- the model call ---------------------------------------------------------------------------------------

    def forward(self, input: torch.Tensor, sigma: torch.Tensor | float, **kwargs: Any) -> torch.Tensor:
        """x̂₀ [B, C, H, W] of the VE state input [B, C, H, W] at noise levels sigma ([B] or a scalar)."""
        labels = kwargs.pop("labels", None)
        if kwargs:
            raise TypeError(f"a scorefield denoiser as a k-diffusion model takes labels= only (extra_args="
                            f"{{'labels': y}}), got {', '.join(sorted(kwargs))}")
        sigma = torch.as_tensor(sigma, device=input.device).to(torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(input.shape[0])
        ab = 1.0 / (1.0 + sigma**2)                                           # [B] float64
        x_vp = input * ab.sqrt().to(input.dtype).reshape(-1, 1, 1, 1)         # [B, C, H, W]
        return self.inner_model(x_vp, ab.to(input.dtype), labels)

    # ---- k-diffusion's schedule interface ---------------------------------------------------------------------

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """n noise levels from sigma_max down to sigma_min, uniform in the schedule's time, then 0 ([n+1]); the
        whole table (descending) and 0 when n is None. Like k-diffusion's DiscreteSchedule.get_sigmas."""
        if n is None:
            return torch.cat([self.sigmas.flip(0), self.sigmas.new_zeros(1)])
        t = torch.linspace(float(self.sigma_to_t(self.sigma_max)), float(self.sigma_to_t(self.sigma_min)), int(n),
                           dtype=torch.float64)
        sig = self.t_to_sigma(t).to(self.sigmas)
        return torch.cat([sig, sig.new_zeros(1)])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The schedule's time of the noise level σ (float64)."""
        return self.schedule.t_from_sigma_ve(torch.as_tensor(sigma).to(torch.float64))

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """The noise level σ of the schedule's time t (float64)."""
        return self.schedule.sigma_ve(torch.as_tensor(t).to(torch.float64))

    # ---- what from_edm and the analyses read ------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.inner_model.image_shape

    @property
    def conditional(self) -> bool:
        return bool(self.inner_model.conditional)

    @property
    def unconditional_without_labels(self) -> bool:
        return bool(self.inner_model.unconditional_without_labels)

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule.name}, sigma_min={float(self.sigma_min):.4g}, "
                f"sigma_max={float(self.sigma_max):.4g}, table={len(self.sigmas)}")


def _table_times(schedule: Schedule, sigma_max: float, size: int) -> torch.Tensor:
    """`size` increasing times of the schedule, uniform from t_min (or its first step, where σ(t_min) = 0, the
    ᾱ = 1 end of VP schedules) to the time where σ reaches min(σ(t_max), sigma_max)."""
    f64 = torch.float64
    t_end = float(schedule.t_max)
    if float(schedule.sigma_ve(torch.tensor(t_end, dtype=f64))) > sigma_max:
        t_end = float(schedule.t_from_sigma_ve(torch.tensor(sigma_max, dtype=f64)))
    t_start = float(schedule.t_min)
    times = torch.linspace(t_start, t_end, size, dtype=f64)
    if float(schedule.sigma_ve(times[:1])[0]) <= 0:
        times = torch.linspace(t_start, t_end, size + 1, dtype=f64)[1:]
    return times


def to_k_diffusion(model: Denoiser, schedule: str | Schedule = "cosine", *, sigma_max: float = SIGMA_VE_START,
                   table_size: int = TABLE_SIZE) -> KDiffusionModel:
    """Any scorefield denoiser as a k-diffusion model, model(x_ve, σ, labels=None) → x̂₀ (module docstring).

        k_model = sf.models.adapters.to_k_diffusion(sf.models.make("els", data, patch_size=5))
        x = k_diffusion.sampling.sample_heun(k_model, noise * k_model.sigma_max, k_model.get_sigmas(20))

    schedule: the time on which the σ table (`sigmas`, `get_sigmas`) is laid out; sigma_max: the table's top
    (capped at the schedule's own end); table_size: its number of levels. A conditional model takes its labels
    as extra_args={"labels": y}.
    """
    return KDiffusionModel(model, schedule=schedule, sigma_max=sigma_max, table_size=table_size)
