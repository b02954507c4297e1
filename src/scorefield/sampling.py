"""Samplers with one signature, and the user-facing `sample()`.

Every sampler is a function
    sampler(model, x, ts, schedule, labels=None, callback=None, generators=None, **options) -> x_final
walking the descending time grid `ts` [n+1] of `schedule` from the noise `x` [B, C, H, W] (the VP state at
ts[0]) and returning the final samples. `model` follows the one denoiser convention
model(x, alpha_bar[B], labels) -> x̂₀. Samplers are registered in SAMPLERS; the CLI's choices come from it.

Precision. Every sampler keeps its state x, the coefficients ᾱ, σ, γ and all update arithmetic in float64
(STATE_DTYPE), whatever dtype the noise has; that dtype is the denoiser's working dtype: the model is called with
x and ᾱ [B] cast to it, its x̂₀ is cast back to float64 for the update, and the final samples are returned in it.
This is what NVlabs/edm does (generate.py, edm_sampler: `x_next = latents.to(torch.float64) * t_steps[0]`,
`denoised = net(x_hat, t_hat, class_labels).to(torch.float64)`, while the network runs in float32). A float32
denoiser may so be handed ᾱ = 1.0 at fine noise levels (1 − ᾱ below ≈ 6e-8 rounds away in float32) while the
sampler's own 1 − ᾱ is float64 and positive; only grids that float64 cannot resolve are refused
(`check_grid_resolvable`). Trajectory callbacks receive x and x̂₀ in the working dtype (see `_report`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from . import convert
from .options import closest, unknown_options
from .schedules import Schedule, get_schedule, karras_sigmas, time_grid

Tensor = torch.Tensor
Denoise = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {}

# The dtype of every sampler's state x and of its update arithmetic (the denoiser keeps the noise's dtype).
STATE_DTYPE = torch.float64

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


# the arguments every sampler function receives from `sample` (not user options)
SAMPLER_CALL_ARGUMENTS = ("model", "x", "ts", "schedule", "labels", "callback", "generators", "progress")


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
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise SamplingError(f"the number of samples must be a positive integer, got {n!r}")
    if len(image_shape) != 3 or any(int(v) != v or v < 1 for v in image_shape):
        raise SamplingError(f"image_shape must be (C, H, W) of positive integers, got {tuple(image_shape)}")
    n = int(n)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(n)]
    if len(seeds) != n:
        raise SamplingError(f"{len(seeds)} seeds given for {n} samples")
    return per_sample_normal(image_shape, make_generators(seeds))


# ---- guidance --------------------------------------------------------------------------------------------

WINDOW_VARIABLES = ("alpha_bar", "sigma", "t", "step", "fraction")


@dataclass
class Guidance:
    """Classifier-free guidance x̂₀ = x̂₀(∅) + w·(x̂₀(y) − x̂₀(∅)), w = scale inside the window, 1 outside.

    The window (a guidance pulse) may be given in whichever variable one thinks in — at most one of
    `alpha_bar_min/max` (ᾱ), `sigma_min/max` (EDM's σ = √((1−ᾱ)/ᾱ)), `t_min/max` (the schedule's time),
    `step_min/max` (sampler step indices 0…n−1, step i evaluating the denoiser at the grid time tᵢ) or
    `fraction_min/max` (i/n of those steps) — an open end is left as None. `resolve(schedule, grid)` converts it
    exactly to the ᾱ window the sampler applies, and `steps(schedule, grid)` lists the steps it covers.
    (The criticality paper writes D_c + w'·(D_c − D_u) with w' = 0 outside the pulse: w = 1 + w'.)
    """

    scale: float = 1.0
    alpha_bar_min: float | None = None
    alpha_bar_max: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    step_min: int | None = None
    step_max: int | None = None
    fraction_min: float | None = None
    fraction_max: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.scale)):
            raise SamplingError(f"the guidance scale must be finite, got {self.scale}")
        given = [v for v in WINDOW_VARIABLES if self._bounds(v) != (None, None)]
        if len(given) > 1:
            raise SamplingError(f"give the guidance window in one variable, got {', '.join(given)}")
        self.variable = given[0] if given else None
        lo, hi = self._bounds(self.variable) if given else (None, None)
        if lo is not None and hi is not None and lo > hi:
            raise SamplingError(f"the guidance window needs {self.variable}_min ≤ {self.variable}_max, got {lo} > {hi}")

    def _bounds(self, variable: str) -> tuple[Any, Any]:
        return getattr(self, f"{variable}_min"), getattr(self, f"{variable}_max")

    def alpha_bar_window(self, schedule: Schedule | None = None, grid: Tensor | None = None) -> tuple[float, float]:
        """The window as [ᾱ_min, ᾱ_max] (exact; step and fraction windows need the grid, t windows the schedule)."""
        if self.variable is None:
            return 0.0, 1.0
        lo, hi = self._bounds(self.variable)
        if self.variable == "alpha_bar":
            return (0.0 if lo is None else float(lo)), (1.0 if hi is None else float(hi))
        if self.variable == "sigma":       # ᾱ = 1/(1+σ²) decreases with σ
            return (0.0 if hi is None else 1 / (1 + float(hi) ** 2)), (1.0 if lo is None else 1 / (1 + float(lo) ** 2))
        if schedule is None:
            raise SamplingError(f"a guidance window in {self.variable} needs the schedule (and grid): sample() "
                                "resolves it, or call Guidance.resolve(schedule, grid)")
        if self.variable == "t":           # ᾱ(t) decreases with t
            ab = lambda v: float(schedule.alpha_bar(torch.tensor(float(v), dtype=torch.float64)))  # noqa: E731
            return (0.0 if hi is None else ab(hi)), (1.0 if lo is None else ab(lo))
        if grid is None:
            raise SamplingError(f"a guidance window in {self.variable} needs the sampler's time grid")
        return _step_window(self.steps(schedule, grid), schedule, grid)

    def steps(self, schedule: Schedule, grid: Tensor) -> list[int]:
        """The sampler steps (0…n−1, step i evaluating the denoiser at grid[i]) that the window covers."""
        n = len(grid) - 1
        if self.variable in ("step", "fraction"):
            lo, hi = self._bounds(self.variable)
            scale = 1 if self.variable == "step" else n
            lo = -math.inf if lo is None else float(lo) * scale
            hi = math.inf if hi is None else float(hi) * scale
            return [i for i in range(n) if lo - 1e-9 <= i <= hi + 1e-9]
        ab = schedule.alpha_bar(torch.as_tensor(grid[:-1], dtype=torch.float64))
        a_lo, a_hi = self.alpha_bar_window(schedule, grid)
        return [i for i in range(n) if a_lo <= float(ab[i]) <= a_hi]

    def resolve(self, schedule: Schedule, grid: Tensor) -> Guidance:
        """The same guidance with its window as an ᾱ window (what `weight` applies)."""
        lo, hi = self.alpha_bar_window(schedule, grid)
        return Guidance(scale=self.scale, alpha_bar_min=lo, alpha_bar_max=hi)

    def weight(self, alpha_bar: Tensor) -> Tensor:
        lo, hi = self.alpha_bar_window()
        inside = (alpha_bar >= lo) & (alpha_bar <= hi)
        return torch.where(inside, torch.full_like(alpha_bar, self.scale), torch.ones_like(alpha_bar))


def _step_window(steps: list[int], schedule: Schedule, grid: Tensor) -> tuple[float, float]:
    """An ᾱ window holding exactly the grid ᾱ of `steps` (consecutive), its ends halfway (geometrically) to the
    neighbouring steps' ᾱ, so that the denoiser's ᾱ, rounded to float32, still falls inside."""
    if not steps:
        return 2.0, 2.0                                  # covers nothing
    ab = schedule.alpha_bar(torch.as_tensor(grid, dtype=torch.float64)).tolist()   # increasing along the steps
    first, last = steps[0], steps[-1]
    lo = 0.0 if first == 0 else math.sqrt(max(ab[first - 1], 1e-300) * ab[first])
    hi = 1.0 if last + 1 >= len(grid) - 1 else math.sqrt(ab[last] * ab[last + 1])
    return lo, hi


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
    """ᾱ(t) as a float64 [B] tensor on x's device (the sampler's coefficient; `_denoise` casts it for the model)."""
    ab = schedule.alpha_bar(torch.as_tensor(t, dtype=torch.float64)).to(STATE_DTYPE)
    return ab.expand(batch).to(like.device)


def _denoise(model: Denoise, x: Tensor, ab: Tensor, labels: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x̂₀ [B, C, H, W] in float64 from the denoiser run in its working dtype: the float64 state x [B, C, H, W] and
    ᾱ [B] are cast to `dtype` for the call (ᾱ may round to 1 there; the sampler's own 1 − ᾱ stays float64)."""
    return model(x.to(dtype), ab.to(dtype), labels).to(STATE_DTYPE)


def _report(callback: Callback | None, step: int, t: float, ab: Tensor, x: Tensor, x0: Tensor | None,
            dtype: torch.dtype) -> None:
    """Hand step `step` to the callback: t and alpha_bar as Python floats (ᾱ of the float64 grid), x and x0_hat
    [B, C, H, W] in the denoiser's working dtype `dtype` (the noise's dtype), x being exactly the tensor the
    model was called with; x0_hat is None at the final state. Cast alpha_bar to x's dtype to get the ᾱ the
    model saw."""
    if callback is not None:
        callback({"step": step, "t": float(t), "alpha_bar": float(ab[0]), "x": x.to(dtype),
                  "x0_hat": None if x0 is None else x0.to(dtype)})


@register_sampler("ddim")
def sample_ddim(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                eta: float = 0.0, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{i+1} = √ᾱ_{i+1} x̂₀ + √(1−ᾱ_{i+1}−σ_i²) ε̂ + σ_i z,
    σ_i = η √((1−ᾱ_{i+1})/(1−ᾱ_i)) √(1−ᾱ_i/ᾱ_{i+1}); η = 0 is deterministic (the papers' 20-step sampler).
    State and update in float64, the model in x's dtype; returns x's dtype (module docstring, "Precision")."""
    if not 0.0 <= float(eta) <= 1.0:
        raise SamplingError(f"DDIM's eta must lie in [0, 1] (0: deterministic, 1: DDPM-like), got {eta}")
    if eta > 0 and generators is None:
        raise SamplingError("DDIM with eta > 0 needs per-sample generators (pass seeds)")
    B, dtype = x.shape[0], x.dtype
    x = x.to(STATE_DTYPE)                                                     # x: [B, C, H, W] float64
    for i in tqdm(range(len(ts) - 1), desc="ddim", disable=not progress, leave=False):
        ab, ab_next = _ab(schedule, ts[i], B, x), _ab(schedule, ts[i + 1], B, x)   # [B] float64
        x0 = _denoise(model, x, ab, labels, dtype)                            # 1. denoise
        _report(callback, i, ts[i], ab, x, x0, dtype)
        eps = convert.eps_from_x0(x, x0, ab)                                  # 2. implied noise
        sigma = eta * ((1 - ab_next) / (1 - ab).clamp_min(1e-20)).sqrt() * (1 - ab / ab_next).clamp_min(0).sqrt()
        c = convert._per_sample
        x = c(ab_next.sqrt(), x) * x0 + c((1 - ab_next - sigma**2).clamp_min(0).sqrt(), x) * eps  # 3. step
        if eta > 0:
            x = x + c(sigma, x) * per_sample_normal(x.shape[1:], generators, like=x)   # same draws, cast
    _report(callback, len(ts) - 1, ts[-1], _ab(schedule, ts[-1], B, x), x, None, dtype)
    return x.to(dtype)


def _pf_drift(model: Denoise, x: Tensor, t: Tensor, schedule: Schedule, labels: Tensor | None,
              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Probability-flow velocity dx/dt = −γ_t (x + s) (kamb-ganguli eq. 19) at the float64 state x [B, C, H, W],
    the model run in `dtype`; returns (v, x̂₀, ᾱ [B]), all float64."""
    ab = _ab(schedule, t, x.shape[0], x)
    x0 = _denoise(model, x, ab, labels, dtype)
    gamma = schedule.gamma(torch.as_tensor(t, dtype=torch.float64)).to(STATE_DTYPE)
    return convert.drift_from_x0(x, x0, ab, gamma), x0, ab


@register_sampler("euler")
def sample_pf_euler(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                    callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                    progress: bool = False) -> Tensor:
    """Probability-flow ODE (eq. 13, 19) integrated backward in t with Euler steps; state in float64, the model
    in x's dtype, samples returned in x's dtype (module docstring, "Precision")."""
    dtype = x.dtype
    x = x.to(STATE_DTYPE)                                                     # x: [B, C, H, W] float64
    for i in tqdm(range(len(ts) - 1), desc="euler", disable=not progress, leave=False):
        v, x0, ab = _pf_drift(model, x, ts[i], schedule, labels, dtype)
        _report(callback, i, ts[i], ab, x, x0, dtype)
        x = x + (ts[i + 1] - ts[i]).item() * v
    _report(callback, len(ts) - 1, ts[-1], _ab(schedule, ts[-1], x.shape[0], x), x, None, dtype)
    return x.to(dtype)


@register_sampler("heun")
def sample_pf_heun(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                   callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                   progress: bool = False) -> Tensor:
    """Probability-flow ODE with Heun's 2nd-order method (trapezoidal correction); the last step is Euler when
    it ends at ᾱ = 1 (in float64), where the score is undefined. State in float64, the model in x's dtype, samples
    returned in x's dtype (module docstring, "Precision")."""
    dtype = x.dtype
    x = x.to(STATE_DTYPE)                                                     # x: [B, C, H, W] float64
    for i in tqdm(range(len(ts) - 1), desc="heun", disable=not progress, leave=False):
        dt = (ts[i + 1] - ts[i]).item()
        v, x0, ab = _pf_drift(model, x, ts[i], schedule, labels, dtype)
        _report(callback, i, ts[i], ab, x, x0, dtype)
        x_euler = x + dt * v
        if float(schedule.alpha_bar(torch.as_tensor(ts[i + 1], dtype=torch.float64))) < 1.0:
            v_next, _, _ = _pf_drift(model, x_euler, ts[i + 1], schedule, labels, dtype)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_euler
    _report(callback, len(ts) - 1, ts[-1], _ab(schedule, ts[-1], x.shape[0], x), x, None, dtype)
    return x.to(dtype)


@register_sampler("sde")
def sample_sde_euler_maruyama(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule,
                              labels: Tensor | None = None, callback: Callback | None = None,
                              generators: Sequence[torch.Generator] | None = None, progress: bool = False,
                              denoise_last: bool = True) -> Tensor:
    """Reverse SDE dx = [−γx − 2γ s] dt + √(2γ) dW̄ (criticality paper eq. 58 with γ = β/2), Euler–Maruyama
    x_{k+1} = x_k + b Δt + √(2γ|Δt|) η_k (eq. 60). The last step adds no noise when `denoise_last`. State and
    update in float64, the model in x's dtype, samples returned in x's dtype (module docstring, "Precision"); η_k
    are drawn exactly as before the float64 state (same generator calls, then cast), so seeds give the same noise."""
    if generators is None:
        raise SamplingError("the SDE sampler needs per-sample generators (pass seeds)")
    B, dtype = x.shape[0], x.dtype
    x = x.to(STATE_DTYPE)                                                     # x: [B, C, H, W] float64
    n = len(ts) - 1
    for i in tqdm(range(n), desc="sde", disable=not progress, leave=False):
        t = torch.as_tensor(ts[i], dtype=torch.float64)
        dt = (ts[i + 1] - ts[i]).item()
        ab = _ab(schedule, t, B, x)                                           # [B] float64
        x0 = _denoise(model, x, ab, labels, dtype)
        _report(callback, i, ts[i], ab, x, x0, dtype)
        gamma = float(schedule.gamma(t))
        b = -gamma * x - 2 * gamma * convert.score_from_x0(x, x0, ab)       # drift of eq. 58
        x = x + b * dt
        if not (denoise_last and i == n - 1):
            x = x + (2 * gamma * abs(dt)) ** 0.5 * per_sample_normal(x.shape[1:], generators, like=x)
    _report(callback, n, ts[-1], _ab(schedule, ts[-1], B, x), x, None, dtype)
    return x.to(dtype)


@register_sampler("edm")
def sample_edm_heun(model: Denoise, x: Tensor, ts: Tensor, schedule: Schedule, labels: Tensor | None = None,
                    callback: Callback | None = None, generators: Sequence[torch.Generator] | None = None,
                    progress: bool = False) -> Tensor:
    """EDM deterministic Heun sampler (Karras et al. 2022, Alg. 1) in VE coordinates y = x/√ᾱ, σ = σ_VE:
    dy/dσ = (y − D(y; σ))/σ, with D the denoiser; the grid `ts` is converted to σ levels, the last σ is 0.
    As in NVlabs/edm, y and σ are float64 and the denoiser runs in x's dtype; samples are returned in x's dtype."""
    sig = schedule.sigma_ve(torch.as_tensor(ts, dtype=torch.float64))
    sig[-1] = 0.0 if float(schedule.alpha_bar(torch.as_tensor(ts[-1], dtype=torch.float64))) >= 1.0 - 1e-12 \
        else sig[-1]
    B, dtype = x.shape[0], x.dtype

    def D(y: Tensor, s: float) -> tuple[Tensor, Tensor]:
        ab = torch.full((B,), 1.0 / (1.0 + s * s), dtype=STATE_DTYPE, device=y.device)   # [B] float64
        return _denoise(model, y * ab.sqrt().reshape(-1, 1, 1, 1), ab, labels, dtype), ab

    y = x.to(STATE_DTYPE) / schedule.alpha(torch.as_tensor(ts[0], dtype=torch.float64)).item()  # y: [B, C, H, W]
    for i in tqdm(range(len(sig) - 1), desc="edm", disable=not progress, leave=False):
        s, s_next = float(sig[i]), float(sig[i + 1])
        x0, ab = D(y, s)                                                      # 1. denoise at σ_i
        _report(callback, i, ts[i], ab, y * ab[0].sqrt(), x0, dtype)
        d = (y - x0) / s                                                      # 2. dy/dσ (Alg. 1 line 5)
        y_next = y + (s_next - s) * d                                         # 3. Euler step
        if s_next > 0:                                                        # 4. 2nd-order correction
            x0_next, _ = D(y_next, s_next)
            y_next = y + (s_next - s) * 0.5 * (d + (y_next - x0_next) / s_next)
        y = y_next
    ab_end = 1.0 / (1.0 + float(sig[-1]) ** 2)
    x = y * ab_end**0.5
    _report(callback, len(sig) - 1, ts[-1], torch.full((B,), ab_end, dtype=STATE_DTYPE, device=x.device), x, None,
            dtype)
    return x.to(dtype)


# ---- the user-facing entry point ---------------------------------------------------------------------------

def default_grid(schedule: Schedule, steps: int, sampler: str, grid: str | None = None) -> Tensor:
    """The time grid a sampler uses by default: DDIM walks the whole schedule (uniform in t, the papers'
    20-step DDIM; logarithmic on the constant-β schedule and Karras on EDM's, `NATURAL_GRIDS`); ODE/SDE
    samplers start at σ_VE = 80 (ᾱ ≈ 1.6e-4) where γ_t is finite; EDM uses Karras ρ = 7."""
    grid = grid or NATURAL_GRIDS.get(schedule.name, "uniform")
    if sampler == "edm" or grid == "karras":
        sig = karras_sigmas(steps, sigma_max=SIGMA_VE_START)
        ts = schedule.t_from_sigma_ve(sig).to(torch.float64).clamp(schedule.t_min, schedule.t_max)
        ts = ts[torch.cat([ts[:-1] > ts[1:], torch.tensor([True])])]   # a schedule whose t_min is σ_min
        if ts[-1] > schedule.t_min:
            ts = torch.cat([ts, torch.tensor([schedule.t_min], dtype=torch.float64)])
        return ts
    t_start = schedule.t_max
    if sampler != "ddim":
        ab_start = 1.0 / (1.0 + SIGMA_VE_START**2)
        t_start = min(schedule.t_max, float(schedule.t_from_alpha_bar(torch.tensor(ab_start, dtype=torch.float64))))
    return time_grid(schedule, steps, grid, t_start=t_start)


# the grid each schedule is walked on by default: uniform in t where t ∈ [0, 1] (the papers' DDIM), logarithmic
# for the constant-β process whose t runs to T = 50 (Ambrogioni App. E.2), Karras ρ = 7 for EDM's t = σ ∈
# [0.002, 80]. A uniform grid on those two leaves a last step from ᾱ ≈ 0.6 to 1: on Gaussian data the samples'
# covariance came out 25–60% short (tests/test_sampler_exactness.py)
NATURAL_GRIDS = {"constant": "log", "edm": "karras"}


def check_grid_resolvable(schedule: Schedule, ts: Tensor) -> None:
    """Refuse a grid whose noise levels before the last step have 1 − ᾱ = 0 in float64, the samplers' state dtype
    (they would divide by 1 − ᾱ = 0). The denoiser's own dtype does not matter: a float32 model handed ᾱ = 1.0
    is fine, since the sampler's 1 − ᾱ is float64 (module docstring, "Precision"). The last time may reach ᾱ = 1."""
    ab = schedule.alpha_bar(torch.as_tensor(ts[:-1], dtype=torch.float64)).to(STATE_DTYPE)
    unresolved = (1 - ab) <= 0
    if unresolved.any():
        t_bad = float(ts[:-1][unresolved].max())
        raise SamplingError(f"the time grid reaches t = {t_bad:.3g} before its last step, where 1 − ᾱ rounds to 0 "
                            f"even in {STATE_DTYPE} (the samplers' state dtype); end the grid earlier "
                            "(only its last time may reach ᾱ = 1)")


def sample(model: Denoise, noise: Tensor, steps: int = 20, sampler: str = "ddim", schedule: str | Schedule = "cosine",
           labels: Tensor | None = None, callback: Callback | None = None,
           guidance: Guidance | float | None = None, seeds: Sequence[int] | None = None,
           grid: str | None = None, ts: Tensor | None = None, progress: bool = False, clip_x0: bool = False,
           process: Any = None, **sampler_options: Any) -> Tensor:
    """Run `sampler` from `noise` [B, C, H, W] (the state at the first grid time) and return samples [B, C, H, W].

    steps: number of steps; sampler: one of `available_samplers()`; schedule: name or Schedule;
    labels: [B] class labels for conditional models; callback(info) receives every intermediate state
    (keys step, t, alpha_bar, x, x0_hat; x and x0_hat in noise's dtype, alpha_bar a float, see `_report`);
    guidance: classifier-free guidance scale or `Guidance` window; seeds: one seed per sample for stochastic
    samplers (default 0..B-1); grid: 'uniform' | 'log' | 'karras'; ts: an explicit descending time grid
    (overrides steps/grid); clip_x0: clip every x̂₀ to [−1, 1] before the sampler uses it (see `clipped`).

    Precision (as in NVlabs/edm, which keeps the sampler in float64 while the network runs in float32): the
    sampler's state, ᾱ / σ / γ and updates are float64; `model` (with guidance and clipping) is called in
    noise's dtype, with x [B, C, H, W] and ᾱ [B] of that dtype; the samples come back in noise's dtype. So a
    float32 model can walk fine grids, e.g. a log grid down to t = 1e-10, where its ᾱ rounds to 1.0; only a
    grid with 1 − ᾱ = 0 in float64 before its last step is refused.

    process: a component forward process (`sf.forward.make`, RG slides): the reverse of that process is run per
    component instead ('ddim', or the probability-flow ODE 'euler' / 'heun'; see forward/sampling.py).
    """
    if process is not None:
        from .forward.sampling import sample_process  # component processes (RG slides)

        if guidance is not None or grid not in (None, "uniform"):
            raise SamplingError("guidance and non-uniform grids are not available under a component process")
        return sample_process(model, noise, process, steps=steps, sampler=sampler, labels=labels, callback=callback,
                              seeds=seeds, ts=ts, progress=progress, clip_x0=clip_x0, **sampler_options)
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler '{sampler}'{closest(sampler, SAMPLERS)}; available: "
                            f"{', '.join(available_samplers())}")
    problem = unknown_options(sampler_options, SAMPLERS[sampler],
                              skip=SAMPLER_CALL_ARGUMENTS)
    if problem:
        raise SamplingError(f"sampler '{sampler}': {problem}")
    if not isinstance(noise, Tensor) or noise.ndim != 4:
        raise SamplingError(f"noise must be a [B, C, H, W] tensor, got {getattr(noise, 'shape', type(noise))}")
    if not noise.is_floating_point():
        raise SamplingError(f"noise must be a floating-point tensor (its dtype is the model's), got {noise.dtype}")
    if not torch.isfinite(noise).all():
        raise SamplingError("noise contains NaN or infinite values")
    sched = get_schedule(schedule)
    grid_t = ts if ts is not None else default_grid(sched, steps, sampler, grid)
    grid_t = torch.as_tensor(grid_t, dtype=torch.float64)
    if grid_t.ndim != 1 or len(grid_t) < 2 or not (grid_t[1:] < grid_t[:-1]).all():
        raise SamplingError("the time grid must be a strictly decreasing 1-D sequence of at least 2 times")
    check_grid_resolvable(sched, grid_t)
    B = noise.shape[0]
    seeds = list(seeds) if seeds is not None else list(range(B))
    if len(seeds) != B:
        raise SamplingError(f"{len(seeds)} seeds given for a batch of {B}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if isinstance(guidance, Guidance):
        guidance = guidance.resolve(sched, grid_t)
    denoise = clipped(guided(model, guidance), clip_x0)
    with torch.no_grad():
        return SAMPLERS[sampler](denoise, noise.clone(), grid_t, sched, labels=labels, callback=callback,
                                 generators=make_generators(seeds), progress=progress, **sampler_options)
