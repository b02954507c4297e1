"""Samplers with one signature, and the user-facing `sample()`.

Every sampler is a function
    sampler(model, x, ts, schedule, labels=None, callback=None, generators=None, **options) -> x_final
walking the descending time grid `ts` [n+1] of `schedule` from the noise `x` [B, C, H, W] (the VP state at
ts[0]) and returning the final samples. `model` follows the one denoiser convention
model(x, alpha_bar[B], labels) -> x̂₀. Samplers are registered in SAMPLERS; the CLI's choices come from it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from . import convert
from .schedules import Schedule, get_schedule, karras_sigmas, time_grid

Tensor = torch.Tensor
Denoise = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {}

# ODE / SDE samplers start where EDM does, σ_VE = 80 (ᾱ ≈ 1.6e-4): the drift coefficient γ_t of a schedule
# whose ᾱ reaches 0 diverges there.
SIGMA_VE_START = 80.0


class SamplingError(ValueError):
    """Invalid sampler, schedule, grid or noise."""


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    def wrap(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        return fn
    return wrap


def available_samplers() -> list[str]:
    return sorted(SAMPLERS)


# ---- per-sample randomness -------------------------------------------------------------------------------

def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so a sample's noise does not depend on batch size or device."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_sample_normal(shape: Sequence[int], generators: Sequence[torch.Generator],
                      like: Tensor | None = None) -> Tensor:
    """Standard normal [B, *shape] with sample b drawn from generators[b] (on CPU, then moved)."""
    z = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return z.to(like) if like is not None else z


def initial_noise(n: int, image_shape: Sequence[int], seeds: Sequence[int] | None = None,
                  seed: int = 0) -> Tensor:
    """Initial noise [n, C, H, W]; sample i uses seed seeds[i] (default seed + i)."""
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(n)]
    if len(seeds) != n:
        raise SamplingError(f"{len(seeds)} seeds given for {n} samples")
    return per_sample_normal(image_shape, make_generators(seeds))


# ---- guidance --------------------------------------------------------------------------------------------

@dataclass
class Guidance:
    """Classifier-free guidance x̂₀ = x̂₀(∅) + w(ᾱ)·(x̂₀(y) − x̂₀(∅)), w = scale inside the ᾱ window, 1 outside.

    A window [alpha_bar_min, alpha_bar_max] gives a guidance pulse applied only at those noise levels.
    """

    scale: float = 1.0
    alpha_bar_min: float = 0.0
    alpha_bar_max: float = 1.0

    def weight(self, alpha_bar: Tensor) -> Tensor:
        inside = (alpha_bar >= self.alpha_bar_min) & (alpha_bar <= self.alpha_bar_max)
        return torch.where(inside, torch.full_like(alpha_bar, self.scale), torch.ones_like(alpha_bar))


def guided(model: Denoise, guidance: Guidance | float | None) -> Denoise:
    """Wrap `model` with classifier-free guidance (needs labels; the unconditional call is labels=None)."""
    if guidance is None:
        return model
    g = guidance if isinstance(guidance, Guidance) else Guidance(scale=float(guidance))

    def denoise(x: Tensor, alpha_bar: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise SamplingError("guidance needs class labels (labels=[B])")
        cond = model(x, alpha_bar, labels)
        uncond = model(x, alpha_bar, None)
        w = convert._per_sample(g.weight(alpha_bar), x)
        return uncond + w * (cond - uncond)
    return denoise


def clipped(model: Denoise, clip_x0: bool) -> Denoise:
    """Clip x̂₀ to the data range [−1, 1] (DDPM's clip_denoised). The posterior mean of data in [−1, 1] lies in
    [−1, 1], so clipping never moves an estimate away from it; it matters for ε-prediction nets near ᾱ = 0,
    where x̂₀ = (x − √(1−ᾱ)·ε̂)/√ᾱ multiplies every error of ε̂ by up to 1/√ᾱ (analytic machines are never
    clipped in effect: their x̂₀ is a convex combination of data pixels)."""
    if not clip_x0:
        return model

    def denoise(x: Tensor, alpha_bar: Tensor, labels: Tensor | None = None) -> Tensor:
        return model(x, alpha_bar, labels).clamp(-1.0, 1.0)
    return denoise


# ---- samplers --------------------------------------------------------------------------------------------

def _ab(schedule: Schedule, t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """ᾱ(t) as a [B] tensor in x's dtype."""
    return schedule.alpha_bar(torch.as_tensor(t, dtype=torch.float64)).to(like.dtype).expand(batch).to(like.device)


def _report(callback: Callback | None, step: int, t: float, ab: Tensor, x: Tensor, x0: Tensor | None) -> None:
    if callback is not None:
        callback({"step": step, "t": float(t), "alpha_bar": float(ab[0]), "x": x, "x0_hat": x0})


@register_sampler("ddim")
def sample_ddim(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                eta: float = 0.0, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{i+1} = √ᾱ_{i+1} x̂₀ + √(1−ᾱ_{i+1}−σ_i²) ε̂ + σ_i z,
    σ_i = η √((1−ᾱ_{i+1})/(1−ᾱ_i)) √(1−ᾱ_i/ᾱ_{i+1}); η = 0 is deterministic (the papers' 20-step sampler)."""
    if eta > 0 and generators is None:
        raise SamplingError("DDIM with eta > 0 needs per-sample generators (pass seeds)")
    B = x.shape[0]
    for i in tqdm(range(len(ts) - 1), desc="ddim", disable=not progress, leave=False):
        ab, ab_next = _ab(schedule, ts[i], B, x), _ab(schedule, ts[i + 1], B, x)
        x0 = model(x, ab, labels)                                             # 1. denoise
        _report(callback, i, ts[i], ab, x, x0)
        eps = convert.eps_from_x0(x, x0, ab)                                  # 2. implied noise
        sigma = eta * ((1 - ab_next) / (1 - ab).clamp_min(1e-20)).sqrt() * (1 - ab / ab_next).clamp_min(0).sqrt()
        c = convert._per_sample
        x = c(ab_next.sqrt(), x) * x0 + c((1 - ab_next - sigma**2).clamp_min(0).sqrt(), x) * eps  # 3. step
        if eta > 0:
            x = x + c(sigma, x) * per_sample_normal(x.shape[1:], generators, like=x)
    _report(callback, len(ts) - 1, ts[-1], _ab(schedule, ts[-1], B, x), x, None)
    return x


def _pf_drift(model: Denoise, x: Tensor, t: Tensor, schedule: Schedule, labels: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Probability-flow velocity dx/dt = −γ_t (x + s) (kamb-ganguli eq. 19); returns (v, x̂₀, ᾱ)."""
    B = x.shape[0]
    ab = _ab(schedule, t, B, x)
    x0 = model(x, ab, labels)
    gamma = schedule.gamma(torch.as_tensor(t, dtype=torch.float64)).to(x.dtype)
    return convert.drift_from_x0(x, x0, ab, gamma), x0, ab


@register_sampler("euler")
def sample_pf_euler(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                    callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                    progress: bool = False) -> Tensor:
    """Probability-flow ODE (eq. 13, 19) integrated backward in t with Euler steps."""
    for i in tqdm(range(len(ts) - 1), desc="euler", disable=not progress, leave=False):
        v, x0, ab = _pf_drift(model, x, ts[i], schedule, labels)
        _report(callback, i, ts[i], ab, x, x0)
        x = x + (ts[i + 1] - ts[i]).item() * v
    _report(callback, len(ts) - 1, ts[-1], _ab(schedule, ts[-1], x.shape[0], x), x, None)
    return x


@register_sampler("heun")
def sample_pf_heun(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                   callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                   progress: bool = False) -> Tensor:
    """Probability-flow ODE with Heun's 2nd-order method (trapezoidal correction); the last step is Euler when
    it ends at ᾱ = 1, where the score is undefined."""
    for i in tqdm(range(len(ts) - 1), desc="heun", disable=not progress, leave=False):
        dt = (ts[i + 1] - ts[i]).item()
        v, x0, ab = _pf_drift(model, x, ts[i], schedule, labels)
        _report(callback, i, ts[i], ab, x, x0)
        x_euler = x + dt * v
        if float(schedule.alpha_bar(ts[i + 1])) < 1.0:
            v_next, _, _ = _pf_drift(model, x_euler, ts[i + 1], schedule, labels)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_euler
    _report(callback, len(ts) - 1, ts[-1], _ab(schedule, ts[-1], x.shape[0], x), x, None)
    return x


@register_sampler("sde")
def sample_sde_euler_maruyama(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule,
                              labels: Tensor | None = None, callback: Callback | None = None,
                              generators: Sequence[torch.Generator] | None = None, progress: bool = False,
                              denoise_last: bool = True) -> Tensor:
    """Reverse SDE dx = [−γx − 2γ s] dt + √(2γ) dW̄ (criticality paper eq. 58 with γ = β/2), Euler–Maruyama
    x_{k+1} = x_k + b Δt + √(2γ|Δt|) η_k (eq. 60). The last step adds no noise when `denoise_last`."""
    if generators is None:
        raise SamplingError("the SDE sampler needs per-sample generators (pass seeds)")
    B = x.shape[0]
    n = len(ts) - 1
    for i in tqdm(range(n), desc="sde", disable=not progress, leave=False):
        t = torch.as_tensor(ts[i], dtype=torch.float64)
        dt = (ts[i + 1] - ts[i]).item()
        ab = _ab(schedule, t, B, x)
        x0 = model(x, ab, labels)
        _report(callback, i, ts[i], ab, x, x0)
        gamma = float(schedule.gamma(t))
        b = -gamma * x - 2 * gamma * convert.score_from_x0(x, x0, ab)
        x = x + b * dt
        if not (denoise_last and i == n - 1):
            x = x + (2 * gamma * abs(dt)) ** 0.5 * per_sample_normal(x.shape[1:], generators, like=x)
    _report(callback, n, ts[-1], _ab(schedule, ts[-1], B, x), x, None)
    return x


@register_sampler("edm")
def sample_edm_heun(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                    callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                    progress: bool = False) -> Tensor:
    """EDM deterministic Heun sampler (Karras et al. 2022, Alg. 1) in VE coordinates y = x/√ᾱ, σ = σ_VE:
    dy/dσ = (y − D(y; σ))/σ, with D the denoiser; the grid `ts` is converted to σ levels, the last σ is 0."""
    sig = schedule.sigma_ve(torch.as_tensor(ts, dtype=torch.float64))
    sig[-1] = 0.0 if float(schedule.alpha_bar(ts[-1])) >= 1.0 - 1e-12 else sig[-1]
    B = x.shape[0]

    def D(y: Tensor, s: float) -> tuple[Tensor, Tensor]:
        ab = torch.full((B,), 1.0 / (1.0 + s * s), dtype=y.dtype, device=y.device)
        return model(y * ab.sqrt().reshape(-1, 1, 1, 1), ab, labels), ab

    y = x / schedule.alpha(torch.as_tensor(ts[0], dtype=torch.float64)).item()
    for i in tqdm(range(len(sig) - 1), desc="edm", disable=not progress, leave=False):
        s, s_next = float(sig[i]), float(sig[i + 1])
        x0, ab = D(y, s)                                                      # 1. denoise at σ_i
        _report(callback, i, ts[i], ab, y * ab[0].sqrt(), x0)
        d = (y - x0) / s                                                      # 2. dy/dσ (Alg. 1 line 5)
        y_next = y + (s_next - s) * d                                         # 3. Euler step
        if s_next > 0:                                                        # 4. 2nd-order correction
            x0_next, _ = D(y_next, s_next)
            y_next = y + (s_next - s) * 0.5 * (d + (y_next - x0_next) / s_next)
        y = y_next
    ab_end = 1.0 / (1.0 + float(sig[-1]) ** 2)
    x = y * ab_end**0.5
    _report(callback, len(sig) - 1, ts[-1], torch.full((B,), ab_end), x, None)
    return x


# ---- the user-facing entry point ---------------------------------------------------------------------------

def default_grid(schedule: Schedule, steps: int, sampler: str, grid: str | None = None) -> Tensor:
    """The time grid a sampler uses by default: DDIM walks the whole schedule (uniform in t, the papers'
    20-step DDIM); ODE/SDE samplers start at σ_VE = 80 (ᾱ ≈ 1.6e-4) where γ_t is finite; EDM uses Karras ρ = 7."""
    if sampler == "edm" or grid == "karras":
        sig = karras_sigmas(steps, sigma_max=SIGMA_VE_START)
        ts = schedule.t_from_sigma_ve(sig).to(torch.float64).clamp(schedule.t_min, schedule.t_max)
        return torch.cat([ts, torch.tensor([schedule.t_min], dtype=torch.float64)])
    t_start = schedule.t_max
    if sampler != "ddim":
        ab_start = 1.0 / (1.0 + SIGMA_VE_START**2)
        t_start = min(schedule.t_max, float(schedule.t_from_alpha_bar(torch.tensor(ab_start, dtype=torch.float64))))
    return time_grid(schedule, steps, grid or "uniform", t_start=t_start)


def check_grid_resolvable(schedule: Schedule, ts: Tensor, dtype: torch.dtype) -> None:
    """Refuse a grid whose noise levels before the last step round to ᾱ = 1 in the working dtype (the
    samplers would divide by 1 − ᾱ = 0); float64 noise resolves far finer grids than float32."""
    ab = schedule.alpha_bar(ts[:-1]).to(dtype)
    if (ab >= 1).any():
        t_bad = float(ts[:-1][ab >= 1].max())
        raise SamplingError(f"the time grid reaches t = {t_bad:.3g}, where 1 − ᾱ rounds to 0 in {dtype}; "
                            "end the grid earlier or sample in float64 (float64 noise and dtype='float64' models)")


def sample(model: Denoise, noise: Tensor, steps: int = 20, sampler: str = "ddim", schedule: str | Schedule = "cosine",
           labels: Tensor | None = None, callback: Callback | None = None,
           guidance: Guidance | float | None = None, seeds: Sequence[int] | None = None,
           grid: str | None = None, ts: Tensor | None = None, progress: bool = False, clip_x0: bool = False,
           **sampler_options: Any) -> Tensor:
    """Run `sampler` from `noise` [B, C, H, W] (the state at the first grid time) and return samples [B, C, H, W].

    steps: number of steps; sampler: one of `available_samplers()`; schedule: name or Schedule;
    labels: [B] class labels for conditional models; callback(info) receives every intermediate state
    (keys step, t, alpha_bar, x, x0_hat); guidance: classifier-free guidance scale or `Guidance` window;
    seeds: one seed per sample for stochastic samplers (default 0..B-1); grid: 'uniform' | 'log' | 'karras';
    ts: an explicit descending time grid (overrides steps/grid); clip_x0: clip every x̂₀ to [−1, 1] before the
    sampler uses it (see `clipped`).
    """
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler '{sampler}'; available: {', '.join(available_samplers())}")
    if not isinstance(noise, Tensor) or noise.ndim != 4:
        raise SamplingError(f"noise must be a [B, C, H, W] tensor, got {getattr(noise, 'shape', type(noise))}")
    if not torch.isfinite(noise).all():
        raise SamplingError("noise contains NaN or infinite values")
    sched = get_schedule(schedule)
    grid_t = ts if ts is not None else default_grid(sched, steps, sampler, grid)
    grid_t = torch.as_tensor(grid_t, dtype=torch.float64)
    if grid_t.ndim != 1 or len(grid_t) < 2 or not (grid_t[1:] < grid_t[:-1]).all():
        raise SamplingError("the time grid must be a strictly decreasing 1-D sequence of at least 2 times")
    check_grid_resolvable(sched, grid_t, noise.dtype)
    B = noise.shape[0]
    seeds = list(seeds) if seeds is not None else list(range(B))
    if len(seeds) != B:
        raise SamplingError(f"{len(seeds)} seeds given for a batch of {B}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    denoise = clipped(guided(model, guidance), clip_x0)
    with torch.no_grad():
        return SAMPLERS[sampler](denoise, noise.clone(), grid_t, sched, labels=labels, callback=callback,
                                 generators=make_generators(seeds), progress=progress, **sampler_options)
