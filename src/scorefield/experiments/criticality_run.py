"""Criticality along the reverse process of any denoiser, as a resumable run directory (criticality paper,
ambrogioni-phase-transitions-full.txt, App. E–G).

N reverse trajectories (noise seeds 0..N−1, Euler–Maruyama on the reverse SDE by default, App. E.5) on a time
grid (log grid from T to t_min, eq. 59). Along each one: the correlation length ξ_x(t) of the state at every
grid time (App. E.6 / G.3), and at every `softening_every`-th grid time the directional derivatives λ_v of the
reverse drift along the Fourier modes (E.8–E.9) and ξ_eq (E.10). Trajectories are recorded in parts of
`part_size`, each saved as parts/part-XXX.npz the moment it finishes, so `resume=RUN` loses no part; a resume
with a larger `n` adds trajectories (seeds n_old..n−1) to the same analysis, a smaller one analyses the first
n. Then:

    config.json              every option
    parts/part-XXX.npz       one part's ξ_x, λ_i, λ_j, ξ_eq, snapshots, final states and its wall time
    trajectories.npz         all parts merged, with t, ᾱ and −dξ_x/d log t
    curves.csv               per grid time: t, ᾱ, t/t_c, median ξ_x and median −dξ_x/d log t
    softening.csv            per drift-analysis time: median ξ_eq, median |λ| (modes n ≤ 3), median λ_0, λ_n
    critical_times.csv / .md every critical-time estimate on this schedule: theory (two-state, spectral
                             criterion, zero-field instability, speciation) and the measured peak times
    snapshots.png            a trajectory at log-spaced times (with the dictionary, Fig. 2 / 5)
    criticality.png          ξ_x with rescaled ξ_eq, −dξ_x/d log t, |λ_n| (Fig. 3 / 6 / 7)
    xi_eq.png                ξ_eq(t) with t_c marked
    summary.json             the headline numbers

Models. A `dictionary` machine is integrated as its exact convolutional form (`PatchDictionaryDenoiser`, checked
against the machine at the start; ≈6× faster); a network through its ε̂ in float64 (`ExactEpsNet`), so its
score is −ε̂/σ at every noise level. The default grid is eq. 59's log grid in τ = −log ᾱ (the paper's clock):
on the constant schedule the paper's grid itself, on the others the same noise levels and the same
Euler–Maruyama steps.

Measured times. ξ_eq: argmax of the median over trajectories (the paper's empirical t_c, E.12 / H.3);
−dξ_x/d log t: argmax of its median (the fastest growth of ξ_x as t decreases); ξ_x: the time its median has
covered half its rise (the onset of pattern formation; its argmax is also given); mode softening: argmin of the
median |λ| over trajectories and the low modes n = 1..3 (both directions), and of |λ_0|.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed, tensorboard_log
from ..analysis import criticality as cr
from ..runs import RunDir, atomic_write_bytes, jsonable, markdown_table
from ..sampling import SIGMA_VE_START, initial_noise, sample
from ..schedules import Schedule, get_schedule, log_grid, uniform_grid

ROUTES = ("auto", "machine", "convolution")
GRIDS = ("log-tau", "log", "uniform")
LOW_SHELLS = (1, 2, 3)                     # "low modes" of the softening summary (the ξ_eq shells, E.10)
STATIONARY_DATASETS = ("patch-dictionary", "grf", "two-image")   # randomly rolled / translation-invariant
RESUMABLE_CHANGES = ("model", "n", "smoothing", "tc_range")   # trajectories added / removed, analysis-only options
MAX_THEORY_IMAGES = 10_000                 # images used for the data covariance and the data's patch covariance


def criticality_run(model: Any, image_shape: Sequence[int], n: int = 4, schedule: str | Schedule | None = None,
                    t_max: float | None = None, t_min: float = 1e-3, steps: int = 2000, grid: str = "log-tau",
                    sampler: str = "sde", softening_every: int = 4, method: str = "finite_difference",
                    shells: int = 6, drift: str = "reverse_sde", correlation: str = "binary",
                    smoothing: float = cr.DEFAULT_SMOOTHING, part_size: int = 1, labels: Any = None,
                    data: Any = None, patch_size: int | None = None, stationary_data: bool | None = None,
                    snapshot_times: Sequence[float] | None = None, route: str = "auto",
                    out: str | Path = "runs", name: str | None = None, resume: str | Path | None = None,
                    progress: bool = True, model_spec: dict[str, Any] | None = None,
                    figures: bool = True, tc_range: tuple[float, float] | None = None) -> RunDir:
    """Record `n` reverse trajectories of `model` (any denoiser model(x, ᾱ[, labels]) -> x̂₀) and write the
    criticality analysis into a run directory (module docstring); returns it.

    schedule: default the model's own (config["schedule"] of a net) or "constant" (β = 1, App. E.3);
    t_max: first grid time (default T = 50 on the constant schedule, App. E.5; on the others the time of
    σ_VE = 80, where the samplers start); t_min, steps, grid: the grid, 2000 steps by default: "log-tau"
    (default) is eq. 59's log grid in τ = −log ᾱ(t) — the time of the constant β = 1 process the paper
    integrates — mapped to the schedule's t, so every schedule walks the paper's noise levels with the same
    Euler–Maruyama steps (the reverse SDE in τ, dx = [½x + s] dτ + dW̄_τ, does not depend on the schedule); on
    any constant schedule it is the log grid in t itself; "log": log-spaced in the schedule's own t; "uniform":
    uniform in t; softening_every: the drift analysis runs at every k-th grid time (1: all); method: "finite_difference"
    (E.8, the paper's) or "jvp" (exact); drift: "reverse_sde" (eq. 58) or "probability_flow";
    correlation: "binary" (E.6) or "continuous" (G.3); smoothing: Gaussian width in log t for dξ/d log t;
    data: an ImageSet for the data-covariance theory (Λ) and, for networks, the patch covariance of its
    P×P patches (P = patch_size, default the model's patch size, else 5); stationary_data: compute Λ from the
    power spectrum (translation-invariant data; default for STATIONARY_DATASETS); route: for a `dictionary`
    machine, "auto"/"convolution" integrate with its exact convolutional form (`PatchDictionaryDenoiser`,
    checked against the machine at the start), "machine" with the machine itself; for a network, "auto" uses
    its ε̂ directly (`ExactEpsNet`), "machine" its denoiser call as the samplers do; figures=False skips the
    PNGs (the data behind them is written all the same); tc_range=(lo, hi): also report the argmax of the
    median ξ_eq within lo ≤ t ≤ hi (the paper's empirical t_c searches all times). smoothing and tc_range only
    change the analysis: a resume may change them (and n) and recomputes no trajectory."""
    sched = get_schedule(schedule if schedule is not None else _model_schedule(model))
    _check_options(n, steps, part_size, softening_every, grid, route, method, drift, correlation, shells)
    t_start = _start_time(sched, t_max)
    if not 0 < t_min < t_start:
        raise ValueError(f"t_min must lie in (0, t_max = {t_start:g}), got {t_min!r}")
    ts = _grid(sched, grid, steps, t_start, t_min)
    soft_steps = list(range(0, steps + 1, softening_every))
    snap_t = list(snapshot_times) if snapshot_times is not None else _default_snapshots(sched, t_start, t_min)
    snap_steps = [int(torch.argmin((ts - float(s)).abs())) for s in snap_t]
    denoiser, route_used, route_check = _route(model, route)
    if route == "auto" and callable(getattr(model, "predict_eps", None)):
        denoiser, route_used = ExactEpsNet(model), "exact-eps"
    config = {"model": model_spec or {"name": getattr(model, "name", type(model).__name__)},
              "image_shape": [int(v) for v in image_shape], "n": int(n), "schedule": sched.name,
              "schedule_beta": getattr(sched, "beta", None), "t_max": t_start, "t_min": float(t_min),
              "steps": int(steps), "grid": grid, "sampler": sampler, "softening_every": int(softening_every),
              "method": method, "shells": int(shells), "drift": drift, "correlation": correlation,
              "smoothing": float(smoothing), "part_size": int(part_size), "labels": labels,
              "snapshot_steps": snap_steps, "route": route_used,
              "tc_range": None if tc_range is None else [float(v) for v in tc_range]}
    run = distributed.shared_run(lambda: _open(resume, config, out, name))
    parts = [(start, min(start + part_size, n)) for start in range(0, n, part_size)]
    names = [f"parts/part-{k:03d}.npz" for k in range(len(parts))]
    dtype = _state_dtype(denoiser)
    done = distributed.on_writer(lambda: [_saved_part(run, name, start, stop)
                                          for name, (start, stop) in zip(names, parts, strict=True)])
    pending = [k for k in range(len(parts)) if not done[k]]          # finished before an interruption: kept
    bar = tqdm(total=len(parts), initial=len(parts) - len(pending), desc="criticality", unit="part",
               disable=not progress)

    def compute(k: int) -> dict[str, np.ndarray]:
        start, stop = parts[k]
        began, cpu = time.perf_counter(), time.process_time()
        rec = _record(denoiser, image_shape, start, stop, ts, sched, sampler, soft_steps, snap_steps, method,
                      shells, drift, correlation, _slice_labels(labels, start, stop), dtype)
        rec["seconds"] = np.array(time.perf_counter() - began)
        rec["cpu_seconds"] = np.array(time.process_time() - cpu)
        return rec

    def save(k: int, rec: dict[str, np.ndarray]) -> None:
        run.save_arrays(names[k][:-len(".npz")], replace=True, **rec)
        bar.update(1)

    # under torchrun the parts are dealt to the ranks (seed split); rank 0 saves each and analyses
    distributed.run_units(pending, compute, save, what="parts")
    bar.close()
    with distributed.writer_only() as writing:
        if writing:
            records = []
            for name in names:                                            # in seed order, as one process would
                with np.load(run.file(name)) as z:
                    records.append({key: z[key] for key in z.files})
            _analyse(run, _merge(records), ts, sched, soft_steps, snap_steps, smoothing, model, denoiser, data,
                     patch_size, stationary_data, route_used, route_check, image_shape, drift, figures, tc_range)
            run.release()
    return run


def _saved_part(run: RunDir, name: str, start: int, stop: int) -> bool:
    """Whether part `name` was saved for exactly the seeds start..stop−1 (a resume may change --n and so the
    last part)."""
    if not run.exists(name):
        return False
    with np.load(run.file(name)) as z:
        return z["seeds"].tolist() == list(range(start, stop))


# ---- options ----------------------------------------------------------------------------------------------------

def _check_options(n: int, steps: int, part_size: int, every: int, grid: str, route: str, method: str,
                   drift: str, correlation: str, shells: int) -> None:
    for value, label in ((n, "n"), (steps, "steps"), (part_size, "part_size"), (every, "softening_every")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if n < 2:
        raise ValueError(f"n must be at least 2 (medians over trajectories), got {n}")
    for value, choices, label in ((grid, GRIDS, "grid"), (route, ROUTES, "route"),
                                  (method, cr.SOFTENING_METHODS, "method"), (drift, cr.DRIFTS, "drift"),
                                  (correlation, cr.CORRELATION_METHODS, "correlation")):
        if value not in choices:
            raise ValueError(f"{label} must be one of {', '.join(choices)}; got {value!r}")
    cr._check_shells(shells)


def _grid(sched: Schedule, grid: str, steps: int, t_start: float, t_min: float) -> torch.Tensor:
    """Descending times [steps+1] from t_start to t_min (module docstring of `criticality_run` for the grids)."""
    if grid == "uniform":
        return uniform_grid(steps, t_start, t_min)
    if grid == "log" or (sched.name == "constant" and getattr(sched, "beta", None) is not None):
        return log_grid(steps, t_start, t_min)                   # log τ = log t + log β: the same grid
    tau = -torch.log(sched.alpha_bar(torch.tensor([t_start, t_min], dtype=torch.float64)))
    if not bool((tau > 0).all()) or not bool(torch.isfinite(tau).all()):
        raise ValueError(f"grid 'log-tau' needs 0 < ᾱ < 1 at t_max and t_min, got ᾱ = "
                         f"{sched.alpha_bar(torch.tensor([t_start, t_min], dtype=torch.float64)).tolist()}")
    ts = sched.t_from_alpha_bar(torch.exp(-log_grid(steps, float(tau[0]), float(tau[1])))).to(torch.float64)
    ts[0], ts[-1] = t_start, t_min
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("grid 'log-tau': the schedule's times are not strictly decreasing on this grid; "
                         "use fewer steps or grid='log'")
    return ts


class ExactEpsNet:
    """A network as model(x, ᾱ[, labels]) -> x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ computed in float64 without the ᾱ floor of
    the denoiser call (nets.ALPHA_BAR_FLOOR = 1e-4), so that the sampler's and the drift's score
    (√ᾱ x̂₀ − x)/(1−ᾱ) is the network's −ε̂/σ (App. F.3) at every noise level of the grid, down to ᾱ = e^{−50}.
    The net itself still runs in its own dtype."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.name = getattr(net, "name", "net")
        self.config = getattr(net, "config", {})
        self.image_shape = getattr(net, "image_shape", None)

    def __call__(self, x: torch.Tensor, alpha_bar: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = x.to(torch.float64)
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        eps = self.net.predict_eps(z, ab, labels).to(torch.float64)
        c = ab[:, None, None, None]
        return ((z - (1 - c).sqrt() * eps) / c.sqrt()).to(x.dtype)


def _model_schedule(model: Any) -> str:
    config = getattr(model, "config", None) or {}
    return config.get("schedule") or "constant"


def _start_time(sched: Schedule, t_max: float | None) -> float:
    """The first grid time: t_max when given; else T = 50 on the constant schedule (App. E.5) and, on the others,
    as the samplers do (`sampling.default_grid`), the earlier of the schedule's t_max and the time of σ_VE = 80."""
    if t_max is not None:
        if not (isinstance(t_max, (int, float)) and math.isfinite(t_max) and t_max > 0):
            raise ValueError(f"t_max must be a positive finite number, got {t_max!r}")
        if float(sched.alpha_bar(torch.tensor(float(t_max), dtype=torch.float64))) <= 0:
            raise ValueError(f"t_max = {t_max:g}: ᾱ = 0 there on the {sched.name} schedule (the score is undefined)")
        return float(t_max)
    if sched.name == "constant":
        return float(sched.t_max)
    ab = 1.0 / (1.0 + SIGMA_VE_START**2)
    return min(float(sched.t_max), float(sched.t_from_alpha_bar(torch.tensor(ab, dtype=torch.float64))))


def _default_snapshots(sched: Schedule, t_start: float, t_min: float) -> list[float]:
    """Five log-spaced times from ᾱ = 0.02 (σ_VE = 7, still noise) to ᾱ = 0.5 (σ_VE = 1), where patterns form
    around the two-state t_c (ᾱ = 1/26 for 5×5 patches), then the last time t_min (Fig. 2 / 5)."""
    def at(ab: float) -> float:
        return min(t_start, max(t_min, float(sched.t_from_alpha_bar(torch.tensor(ab, dtype=torch.float64)))))

    times = np.exp(np.linspace(math.log(at(0.02)), math.log(at(0.5)), 5))
    return [float(v) for v in times] + [float(t_min)]


def _route(model: Any, route: str) -> tuple[Any, str, float | None]:
    """(the denoiser to integrate, the route name, max |x̂₀ difference| between the routes on a test state)."""
    is_dictionary = getattr(model, "name", None) == "dictionary" and hasattr(model, "bank")
    if route == "machine" or not is_dictionary:
        if route == "convolution":
            raise ValueError("route 'convolution' is only for a `dictionary` machine")
        return model, "machine", None
    fast = cr.PatchDictionaryDenoiser.from_machine(model)
    g = torch.Generator().manual_seed(0)
    shape = (2, *model.image_shape)
    diff = 0.0
    for ab in (1e-4, 0.05, 0.5, 0.99):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            diff = max(diff, float((fast(x, ab) - model(x, ab)).abs().max()))
    if diff > 1e-5:
        raise RuntimeError(f"the convolutional dictionary differs from the machine by {diff:.3g}; use route='machine'")
    return fast, "convolution", diff


def _state_dtype(model: Any) -> torch.dtype:
    """The dtype the model is called in: float64 (analytic machines, `ExactEpsNet`), else a net's own."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.dtype
    return torch.float64


def _open(resume: str | Path | None, config: dict[str, Any], out: str | Path, name: str | None) -> RunDir:
    if resume is None:
        return RunDir.create("criticality", config, root=out, name=name).lock()
    run = RunDir.open(resume).lock()
    if run.config.get("kind") != "criticality":
        run.release()
        raise ValueError(f"resume {resume}: not a criticality run (kind {run.config.get('kind')!r})")
    wanted = json.loads(json.dumps(jsonable(config)))
    changed = sorted(k for k in wanted if k not in RESUMABLE_CHANGES and run.config.get(k) != wanted[k])
    if changed:
        run.release()
        raise ValueError(f"resume {resume}: options differ from the saved run: "
                         + ", ".join(f"{k} {run.config.get(k)!r} → {wanted[k]!r}" for k in changed))
    updates = {k: wanted[k] for k in RESUMABLE_CHANGES if k != "model" and run.config.get(k) != wanted[k]}
    if updates:                                # more (or fewer) trajectories, same seeds per part; analysis options
        run.write_json("config.json", {**run.config, **updates}, replace=True)
    return run


def _slice_labels(labels: Any, start: int, stop: int) -> torch.Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    return labels.expand(stop)[start:stop] if labels.numel() == 1 else labels[start:stop]


# ---- recording --------------------------------------------------------------------------------------------------

def _with_labels(model: Any, labels: torch.Tensor | None) -> Any:
    """model(x, ᾱ) for mode_softening, which repeats each state once per mode (repeat_interleave)."""
    if labels is None:
        return model

    def call(x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        return model(x, alpha_bar, labels.to(x.device).repeat_interleave(x.shape[0] // labels.shape[0]))

    return call


def _record(model: Any, image_shape: Sequence[int], start: int, stop: int, ts: torch.Tensor, sched: Schedule,
            sampler: str, soft_steps: list[int], snap_steps: list[int], method: str, shells: int, drift: str,
            correlation: str, labels: torch.Tensor | None, dtype: torch.dtype) -> dict[str, np.ndarray]:
    b, n_t = stop - start, len(ts)
    xi = np.full((b, n_t), np.nan)
    lam_i = np.full((b, len(soft_steps), shells + 1), np.nan)
    lam_j = np.full_like(lam_i, np.nan)
    xi_eq = np.full((b, len(soft_steps)), np.nan)
    snaps = np.zeros((b, len(snap_steps), *image_shape), dtype=np.float32)
    soft_index = {s: i for i, s in enumerate(soft_steps)}
    softening_model = _with_labels(model, labels)

    def callback(info: dict[str, Any]) -> None:
        step, x = info["step"], info["x"]
        xi[:, step] = cr.correlation_length(x, correlation).numpy()
        for j, s in enumerate(snap_steps):
            if s == step:
                snaps[:, j] = x.detach().cpu().float().numpy()
        if step in soft_index:
            with torch.enable_grad():
                soft = cr.mode_softening(softening_model, x, info["alpha_bar"], schedule=sched, shells=shells,
                                         method=method, drift=drift)
            i = soft_index[step]
            lam_i[:, i], lam_j[:, i], xi_eq[:, i] = (soft.lambdas_i.numpy(), soft.lambdas_j.numpy(),
                                                     soft.xi_eq.numpy())

    noise = initial_noise(b, image_shape, seeds=range(start, stop)).to(dtype)
    final = sample(model, noise, sampler=sampler, schedule=sched, ts=ts, labels=labels, callback=callback,
                   seeds=list(range(start, stop)))
    return {"seeds": np.arange(start, stop), "xi": xi, "lam_i": lam_i, "lam_j": lam_j, "xi_eq": xi_eq,
            "snapshots": snaps, "final": final.detach().cpu().float().numpy()}


def _merge(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = ("seeds", "xi", "lam_i", "lam_j", "xi_eq", "snapshots", "final")
    merged = {k: np.concatenate([r[k] for r in records]) for k in keys}
    merged["seconds"] = np.array([float(r["seconds"]) for r in records])
    merged["cpu_seconds"] = np.array([float(r.get("cpu_seconds", np.nan)) for r in records])
    return merged


# ---- analysis ---------------------------------------------------------------------------------------------------

def _theory_inputs(model: Any, denoiser: Any, data: Any, patch_size: int | None, stationary_data: bool | None,
                   image_shape: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `critical_time_table` from the model (patch size, dictionary) and the data."""
    inputs: dict[str, Any] = {}
    size = patch_size or getattr(denoiser, "patch_size", None) or (getattr(model, "config", None) or {}).get(
        "patch_size")
    size = size if isinstance(size, int) else 5
    inputs["patch_area"] = size * size
    if isinstance(denoiser, cr.PatchDictionaryDenoiser):
        inputs.update(patterns=denoiser.patterns, priors=denoiser.priors, lattice=tuple(image_shape[-2:]))
    elif getattr(model, "name", None) == "dictionary" and hasattr(model, "bank"):
        fast = cr.PatchDictionaryDenoiser.from_machine(model)
        inputs.update(patterns=fast.patterns, priors=fast.priors, lattice=tuple(image_shape[-2:]))
    if data is not None:
        images = data.images[:MAX_THEORY_IMAGES].to(torch.float64)
        name = getattr(data, "name", None)
        stationary = stationary_data if stationary_data is not None else name in STATIONARY_DATASETS
        inputs["data_eigenvalue"] = cr.data_covariance_top_eigenvalue(images, stationary=stationary)
        inputs["data_name"] = f"{name}, {images.shape[0]} images" + (", power spectrum" if stationary else "")
        if "patterns" not in inputs:
            inputs["patch_cov"] = cr.patch_covariance_of_images(images, size, padding="circular")
    return inputs


def _peaks(t: np.ndarray, soft_t: np.ndarray, xi: np.ndarray, growth: np.ndarray, xi_eq: np.ndarray,
           abs_low: np.ndarray, lambda0: np.ndarray, tc_range: tuple[float, float] | None) -> dict[str, Any]:
    tt, st = torch.as_tensor(t), torch.as_tensor(soft_t)
    out: dict[str, Any] = {}

    def put(key: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            peak = fn(*args, **kwargs)
            out[key] = {"t": peak.t, "value": peak.value, "index": peak.index}
        except ValueError:
            out[key] = {"t": float("nan"), "value": float("nan"), "index": -1}

    window = cr.instability_window(torch.as_tensor(lambda0), st)
    out["instability_enter"] = {"t": window.t_enter, "index": window.index_enter}
    out["instability_exit"] = {"t": window.t_exit, "index": window.index_exit}
    put("xi_eq_argmax", cr.critical_time_from_xi_eq, torch.as_tensor(xi_eq), st)
    if math.isfinite(window.t_enter):
        put("xi_eq_argmax_approach", cr.critical_time_from_xi_eq, torch.as_tensor(xi_eq), st,
            t_range=(window.t_enter, math.inf))
    else:
        out["xi_eq_argmax_approach"] = dict(out["xi_eq_argmax"])
    if tc_range is not None:
        put("xi_eq_argmax_in_range", cr.critical_time_from_xi_eq, torch.as_tensor(xi_eq), st,
            t_range=(float(min(tc_range)), float(max(tc_range))))
    put("growth_argmax", cr.median_peak, torch.as_tensor(growth), tt, "max")
    put("xi_half_rise", cr.rise_time, torch.as_tensor(xi), tt, 0.5)
    put("xi_argmax", cr.median_peak, torch.as_tensor(xi), tt, "max")
    put("softest_low_modes", cr.median_peak, torch.as_tensor(abs_low), st, "min")
    put("softest_uniform_mode", cr.median_peak, torch.as_tensor(np.abs(lambda0)), st, "min")
    return out


MEASURED = (("xi_eq_argmax", "empirical t_c: argmax of the median ξ_eq (E.12, H.3)"),
            ("xi_eq_argmax_approach", "argmax of the median ξ_eq before the instability window"),
            ("xi_eq_argmax_in_range", "argmax of the median ξ_eq within tc_range"),
            ("instability_enter", "median λ_0 turns ≤ 0 (drift unstable along the uniform mode)"),
            ("instability_exit", "median λ_0 turns > 0 again"),
            ("growth_argmax", "peak of the median −dξ_x/d log t (E.7)"),
            ("xi_half_rise", "median ξ_x at half its rise (onset of patterns)"),
            ("xi_argmax", "argmax of the median ξ_x"),
            ("softest_low_modes", "argmin of the median abs(λ_n), n = 1..3 (mode softening)"),
            ("softest_uniform_mode", "argmin of the median abs(λ_0) (uniform mode)"))


def _analyse(run: RunDir, rec: dict[str, np.ndarray], ts: torch.Tensor, sched: Schedule, soft_steps: list[int],
             snap_steps: list[int], smoothing: float, model: Any, denoiser: Any, data: Any,
             patch_size: int | None, stationary_data: bool | None, route: str, route_check: float | None,
             image_shape: Sequence[int], drift: str, figures: bool, tc_range: tuple[float, float] | None) -> None:
    t = ts.numpy()
    soft_t = t[soft_steps]
    alpha_bar = sched.alpha_bar(ts).numpy()
    xi = rec["xi"]
    growth = -cr.log_time_derivative(torch.as_tensor(xi), ts, smoothing).numpy()
    lam_i, lam_j, xi_eq = rec["lam_i"], rec["lam_j"], rec["xi_eq"]
    low = list(LOW_SHELLS)
    abs_low = np.abs(np.concatenate([lam_i[:, :, low], lam_j[:, :, low]], axis=2))    # [N, S, 6]
    abs_low_flat = abs_low.transpose(0, 2, 1).reshape(-1, len(soft_steps))         # [N·6, S]
    run.save_arrays("trajectories", replace=True, t=t, alpha_bar=alpha_bar, soft_t=soft_t, growth=growth, **rec)

    theory = _theory_inputs(model, denoiser, data, patch_size, stationary_data, image_shape)
    peaks = _peaks(t, soft_t, xi, growth, xi_eq, abs_low_flat, lam_i[:, :, 0], tc_range)
    measured = [(how, peaks[key]["t"], how) for key, how in MEASURED
                if key in peaks and math.isfinite(peaks[key]["t"])]
    table = cr.critical_time_table(sched, measured=[(n, tt, "") for n, tt, _ in measured], drift=drift,
                                   **theory)
    for row in table:
        if row["kind"] == "measured":
            row["criterion"] = "median over trajectories"
    title = f"Critical-time estimates on the {sched.name} schedule (t, ᾱ = α², σ_VE = σ/α)"
    run.save_table("critical_times", table, replace=True, title=title)
    escaped = [{k: v.replace("|", "\\|") if isinstance(v, str) else v for k, v in row.items()} for row in table]
    atomic_write_bytes(run.file("critical_times.md"), markdown_table(escaped, list(cr.TABLE_COLUMNS),
                                                                     title=title).encode())
    t_c = cr._noise_ratio_time(float(theory["patch_area"]), sched)[0]
    med_xi, med_growth = cr.median_curve(torch.as_tensor(xi)), cr.median_curve(torch.as_tensor(growth))
    run.save_table("curves", [{"t": float(t[i]), "alpha_bar": float(alpha_bar[i]), "t_over_tc": float(t[i] / t_c),
                               "xi_median": float(med_xi[i]), "growth_median": float(med_growth[i])}
                              for i in range(len(t))], replace=True)
    med_eq = cr.median_curve(torch.as_tensor(xi_eq), cr.XI_EQ_MIN_FRACTION)
    med_low = cr.median_curve(torch.as_tensor(abs_low_flat))
    lam_med = [cr.median_curve(torch.as_tensor((lam_i[:, :, n] + lam_j[:, :, n]) / 2))
               for n in range(lam_i.shape[2])]                          # the same (lower) median as the peaks
    rows = []
    for j, s in enumerate(soft_steps):
        row = {"t": float(t[s]), "alpha_bar": float(alpha_bar[s]), "t_over_tc": float(t[s] / t_c),
               "xi_eq_median": float(med_eq[j]), "abs_lambda_low_median": float(med_low[j])}
        for shell, med in enumerate(lam_med):
            row[f"lambda_{shell}_median"] = float(med[j])
        rows.append(row)
    run.save_table("softening", rows, replace=True)

    if figures:
        _figures(run, model, t, xi, growth, soft_t, xi_eq, lam_i, lam_j, t_c, peaks, theory, rec, snap_steps)
    summary = {"n": int(xi.shape[0]), "steps": len(t) - 1, "softening_times": len(soft_steps),
               "schedule": sched.name, "route": route, "route_max_abs_difference": route_check,
               "seconds": float(rec["seconds"].sum()), "seconds_per_part": rec["seconds"].tolist(),
               "cpu_seconds": float(np.nansum(rec["cpu_seconds"])), "cpu_seconds_per_part": rec["cpu_seconds"].tolist(),
               "t_c_two_state": t_c, "measured": peaks,
               "theory": {r["estimate"]: r["t"] for r in table if r["kind"] == "theory"}}
    tensorboard_log.log_summary(run, summary)
    run.write_json("summary.json", summary, replace=True)


def _figures(run: RunDir, model: Any, t: np.ndarray, xi: np.ndarray, growth: np.ndarray, soft_t: np.ndarray,
             xi_eq: np.ndarray, lam_i: np.ndarray, lam_j: np.ndarray, t_c: float, peaks: dict[str, Any],
             theory: dict[str, Any], rec: dict[str, np.ndarray], snap_steps: list[int]) -> None:
    from ..analysis import criticality_figures as figs

    t_measured = peaks["xi_eq_argmax"]["t"]
    label = (getattr(model, "config", None) or {}).get("name") or getattr(model, "name", "model")
    title = f"{label}: {xi.shape[0]} trajectories, {len(t) - 1} steps"
    abs_all = np.abs(np.concatenate([lam_i, lam_j[:, :, 1:]], axis=2))              # [N, S, 2·shells+1]
    window = (peaks["instability_exit"]["t"], peaks["instability_enter"]["t"])
    run.save_figure("criticality", figs.criticality_figure(t, xi, growth, soft_t, xi_eq, abs_all, t_c,
                                                           t_measured, title, window), replace=True)
    run.save_figure("xi_eq", figs.xi_eq_figure(soft_t, xi_eq, t_c, t_measured, title, window), replace=True)
    patterns = theory.get("patterns")
    run.save_figure("snapshots", figs.snapshot_figure(rec["snapshots"][0], [float(t[s]) for s in snap_steps],
                                                      patterns, f"trajectory of seed {int(rec['seeds'][0])}"),
                    replace=True)


__all__ = ["ExactEpsNet", "criticality_run"]
