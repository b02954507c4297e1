"""Reverse processes of the component processes: DDIM and the probability-flow ODE, per component.

With c = Q x, the marginals c_k(t) ~ N(m_k c_k(0), v_k) (forward.process, eq. 1) and the denoiser's ĉ₀:

- DDIM (Song et al. 2021, eq. 12, per component): ẑ = (c − m ĉ₀)/√v and
      c' = m' ĉ₀ + √(v' − s²) ẑ + s ξ,     s² = η² v' (1 − SNR/SNR'),  SNR = m²/v,
  which for m = √ᾱ, v = 1 − ᾱ is the toolkit's DDIM (its σ_i² = η² ((1−ᾱ')/(1−ᾱ))(1 − ᾱ/ᾱ')). The last step to the
  data time (t_min) lands on x̂₀, as DDIM's does at ᾱ = 1.
- Probability-flow ODE (Song et al. 2021, eq. 13, per component) of dc = a c dt + g dw:
      dc/dt = a c − ½ g² ∇ log p_t = a c + ½ g² (c − m ĉ₀)/v,    a = d log m/dt,  g² = dv/dt − 2 a v,
  which for the VP process is the toolkit's −γ(x + s) (kamb-ganguli eq. 19); Euler or Heun steps backward in t.
  Where the marginal jumps at t_min (heat dissipation: finest blur → data) the last step lands on x̂₀.

The samplers start from `process.prior(noise, t_start)`: the process's end point (for the standard process the
noise itself) or the Gaussian fit of p_t (heat dissipation, whose low frequencies are never erased). As in
`scorefield.sampling`, state and updates are float64 and the denoiser runs in the noise's dtype.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..options import closest
from ..schedules import uniform_grid
from .denoisers import as_process_denoiser
from .process import ComponentProcess, ProcessError

Tensor = torch.Tensor
STATE_DTYPE = torch.float64
PROCESS_SAMPLERS = ("ddim", "euler", "heun")
ODE_SAMPLERS = ("euler", "heun")


def process_grid(process: ComponentProcess, steps: int, sampler: str, t_start: float | None = None,
                 t_end: float | None = None) -> Tensor:
    """Descending uniform times [steps+1]: DDIM from t_max, the ODE samplers from `process.ode_t_start()` (the
    toolkit's σ_VE = 80 point for VP processes), both down to t_min."""
    if t_start is None:
        t_start = process.t_max if sampler == "ddim" else process.ode_t_start()
    return uniform_grid(steps, t_start, process.t_min if t_end is None else t_end)


def _normal(shape: Sequence[int], generators: Sequence[torch.Generator], like: Tensor) -> Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(like)


def sample_process(model: Any, noise: Tensor, process: ComponentProcess, steps: int = 20, sampler: str = "ddim",
                   labels: Tensor | None = None, callback: Callable[[dict[str, Any]], None] | None = None,
                   seeds: Sequence[int] | None = None, ts: Tensor | None = None, eta: float = 0.0,
                   progress: bool = False, clip_x0: bool = False, prior: bool = True) -> Tensor:
    """Samples [B, C, H, W] (noise's dtype) of the reverse of `process`, from standard normal `noise` [B, C, H, W].

    model: a network trained under the process, a ProcessDenoiser, or (standard process only) any toolkit
    denoiser; sampler: 'ddim' (eta ∈ [0, 1]) | 'euler' | 'heun' (probability-flow ODE); ts: an explicit descending
    time grid; prior=False takes `noise` as the state at ts[0] itself. callback(info) gets step, t, x, x0_hat
    (x0_hat None at the end) and alpha_bar (the base schedule's ᾱ(t) of VP processes, else None)."""
    if sampler not in PROCESS_SAMPLERS:
        raise ProcessError(f"unknown sampler '{sampler}' for a component process{closest(sampler, PROCESS_SAMPLERS)}; "
                           f"available: {', '.join(PROCESS_SAMPLERS)}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ProcessError(f"DDIM's eta must lie in [0, 1], got {eta}")
    if eta and sampler != "ddim":
        raise ProcessError("eta applies to the DDIM sampler")
    if not isinstance(noise, Tensor) or noise.ndim != 4 or tuple(noise.shape[1:]) != process.image_shape:
        raise ProcessError(f"noise must be [B, {', '.join(map(str, process.image_shape))}] for this process, got "
                           f"{tuple(getattr(noise, 'shape', ()))}")
    grid = process_grid(process, steps, sampler) if ts is None else torch.as_tensor(ts, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 2 or not (grid[1:] < grid[:-1]).all():
        raise ProcessError("the time grid must be a strictly decreasing 1-D sequence of at least 2 times")
    if float(grid[0]) > process.t_max + 1e-12 or float(grid[-1]) < process.t_min - 1e-12:
        raise ProcessError(f"the time grid [{float(grid[-1])}, {float(grid[0])}] leaves the process's "
                           f"[{process.t_min}, {process.t_max}]")
    B = noise.shape[0]
    seeds = list(seeds) if seeds is not None else list(range(B))
    if len(seeds) != B:
        raise ProcessError(f"{len(seeds)} seeds given for a batch of {B}")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    denoiser = as_process_denoiser(model, process)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    x = process.prior(noise, grid[0]) if prior else noise.to(STATE_DTYPE)
    with torch.no_grad():
        if sampler == "ddim":
            return _ddim(denoiser, x, grid, process, labels, callback, generators, float(eta), noise.dtype,
                         progress, clip_x0)
        return _ode(denoiser, x, grid, process, labels, callback, sampler, noise.dtype, progress, clip_x0)


def _call(denoiser: Any, x: Tensor, t: float, labels: Tensor | None, dtype: torch.dtype, clip: bool) -> Tensor:
    """x̂₀ (float64) of the float64 state x [B, C, H, W], the denoiser run in `dtype`."""
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float64)
    x0 = denoiser(x.to(dtype), tt, labels).to(STATE_DTYPE)
    return x0.clamp(-1.0, 1.0) if clip else x0


def _report(callback: Any, process: ComponentProcess, step: int, t: float, x: Tensor, x0: Tensor | None,
            dtype: torch.dtype) -> None:
    if callback is None:
        return
    ab = None
    if process.schedule is not None:
        ab = float(process.schedule.base_alpha_bar(torch.tensor([float(t)], dtype=torch.float64))[0])
    callback({"step": step, "t": float(t), "alpha_bar": ab, "x": x.to(dtype),
              "x0_hat": None if x0 is None else x0.to(dtype)})


def _ddim(denoiser: Any, x: Tensor, ts: Tensor, process: ComponentProcess, labels: Tensor | None,
          callback: Any, generators: list[torch.Generator], eta: float, dtype: torch.dtype, progress: bool,
          clip: bool) -> Tensor:
    basis = process.basis
    m_all, v_all = process.coefficients(ts)                                            # [n+1, D] float64
    m_all, v_all = m_all.to(x.device), v_all.to(x.device)
    n = len(ts) - 1
    for i in tqdm(range(n), desc="ddim (process)", disable=not progress, leave=False):
        x0 = _call(denoiser, x, float(ts[i]), labels, dtype, clip)                     # 1. denoise
        _report(callback, process, i, float(ts[i]), x, x0, dtype)
        if i == n - 1 and float(ts[-1]) <= process.t_min:                              # the data time: x̂₀
            x = x0
            continue
        m, v, m1, v1 = m_all[i], v_all[i], m_all[i + 1], v_all[i + 1]                  # [D]
        c, c0 = basis.forward(x), basis.forward(x0)                                    # [B, D]
        z = (c - m * c0) / v.clamp_min(1e-20).sqrt()                                   # 2. implied noise
        s2 = torch.zeros_like(v1)
        if eta > 0:
            snr_ratio = (m**2 * v1) / (m1**2 * v).clamp_min(1e-300)                   # SNR / SNR'
            s2 = (eta**2 * v1 * (1 - snr_ratio)).clamp_min(0)
        c_next = m1 * c0 + (v1 - s2).clamp_min(0).sqrt() * z                           # 3. step
        if eta > 0:
            c_next = c_next + s2.sqrt() * basis.forward(_normal(x.shape[1:], generators, x))
        x = basis.inverse(c_next)
    _report(callback, process, n, float(ts[-1]), x, None, dtype)
    return x.to(dtype)


def _velocity(denoiser: Any, x: Tensor, t: float, process: ComponentProcess, labels: Tensor | None,
              dtype: torch.dtype, clip: bool) -> tuple[Tensor, Tensor]:
    """dx/dt of the probability-flow ODE (module docstring) and x̂₀, float64."""
    basis = process.basis
    x0 = _call(denoiser, x, t, labels, dtype, clip)
    tt = torch.tensor([float(t)], dtype=torch.float64)
    m, v, dm, dv = (u[0].to(x.device) for u in process.derivatives(tt))
    a = dm / m
    g2 = dv - 2 * a * v
    c, c0 = basis.forward(x), basis.forward(x0)
    return basis.inverse(a * c + 0.5 * g2 * (c - m * c0) / v.clamp_min(1e-300)), x0


def _ode(denoiser: Any, x: Tensor, ts: Tensor, process: ComponentProcess, labels: Tensor | None, callback: Any,
         sampler: str, dtype: torch.dtype, progress: bool, clip: bool) -> Tensor:
    n = len(ts) - 1
    for i in tqdm(range(n), desc=f"{sampler} (process)", disable=not progress, leave=False):
        dt = float(ts[i + 1] - ts[i])
        v, x0 = _velocity(denoiser, x, float(ts[i]), process, labels, dtype, clip)
        _report(callback, process, i, float(ts[i]), x, x0, dtype)
        if i == n - 1 and process.jump_at_t_min and float(ts[-1]) <= process.t_min:
            x = x0                                                                     # the jump to the data
            continue
        x_euler = x + dt * v
        if sampler == "heun" and float(ts[i + 1]) > process.t_min:
            v_next, _ = _velocity(denoiser, x_euler, float(ts[i + 1]), process, labels, dtype, clip)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_euler
    _report(callback, process, n, float(ts[-1]), x, None, dtype)
    return x.to(dtype)
