"""The main job: draw samples from any denoiser into a run directory, with the memorization check.

Writes config.json, environment.json, batches/batch-XXXX.npz (one per finished batch: an interrupted run
resumes from them and loses no finished batch), samples.npz, samples.png, nearest.png (each sample over its
nearest training image), memorization.csv/.md (nearest index and RMS distance per sample), summary.json and
metrics.jsonl, engine.jsonl (which route, implementation and device served every engine call, with its
certified bounds; see `engine_log`); optionally trajectories (x and x̂₀ at every step) in the batch files.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data as sf_data
from .. import distributed, tensorboard_log
from .. import models as sf_models
from ..analysis.figures import grid_figure, image_grid_figure
from ..analysis.nearest import nearest_training_images
from ..engine.memory import check_fits
from ..options import closest, unknown_options
from ..runs import RunDir, RunError
from ..sampling import SAMPLER_CALL_ARGUMENTS, SAMPLERS, WINDOW_VARIABLES, Guidance, default_grid, initial_noise, sample
from ..schedules import get_schedule
from . import engine_log
from .networks import run_device


@dataclass
class SampleConfig:
    """Everything that defines a sampling run (saved as config.json; `resume` rebuilds from it)."""

    model: str = "is"
    model_options: dict[str, Any] = field(default_factory=dict)
    model_run: str | None = None           # a training run directory: load the trained network from it
    data: str | None = "digits"           # None with model_run: the data the network was trained on
    data_options: dict[str, Any] = field(default_factory=dict)
    n: int = 16
    steps: int = 20
    sampler: str = "ddim"
    schedule: str = "cosine"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0                          # sample i uses seed + i (noise and sampler randomness)
    labels: list[int] | None = None        # class labels for conditional models (default: cycle over classes)
    batch_size: int = 16
    save_trajectory: bool = False
    guidance: float | None = None          # classifier-free guidance scale w (needs a conditional model)
    guidance_window: dict[str, Any] | None = None   # {"variable": "alpha_bar"|"sigma"|"t"|"step"|"fraction",
                                                    #  "min": ..., "max": ...}: a guidance pulse; default all


class TrajectoryRecorder:
    """A sampler callback keeping the state x and the estimate x̂₀ of every step."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.x0_hat: list[torch.Tensor] = []

    def __call__(self, info: dict[str, Any]) -> None:
        if info["x0_hat"] is not None:
            self.x.append(info["x"].clone())
            self.x0_hat.append(info["x0_hat"].clone())


def guidance_of(cfg: SampleConfig, model: sf_models.Denoiser) -> Guidance | None:
    """The run's classifier-free guidance, checked against the model (guidance needs class labels)."""
    if cfg.guidance is None:
        if cfg.guidance_window is not None:
            raise ValueError("a guidance window was given without a guidance scale (--guidance W)")
        return None
    if not getattr(model, "conditional", False):
        raise ValueError(f"guidance needs a class-conditional model; '{cfg.model}' is unconditional "
                         "(make it with conditional=True, or --model-opt conditional=true)")
    window = dict(cfg.guidance_window or {})
    variable = window.pop("variable", "alpha_bar")
    if variable not in WINDOW_VARIABLES or set(window) - {"min", "max"}:
        raise ValueError(f"a guidance window is {{'variable': one of {', '.join(WINDOW_VARIABLES)}, 'min', "
                         f"'max'}}, got {cfg.guidance_window}")
    return Guidance(scale=float(cfg.guidance), **{f"{variable}_{end}": window.get(end) for end in ("min", "max")})


def with_training_data(cfg: SampleConfig) -> SampleConfig:
    """cfg with data=None replaced by the dataset recorded in its model run (its config.json 'data')."""
    if cfg.data is not None:
        return cfg
    if not cfg.model_run:
        raise ValueError("data (--data) is needed unless a model run (--model-run) records its training data")
    run = RunDir.open(cfg.model_run)
    spec = dict(run.config.get("data") or {})
    name = spec.pop("name", None)
    if not name:
        raise ValueError(f"{run.file('config.json')} does not record its training data by name: pass --data")
    return replace(cfg, data=name, data_options={**spec, **cfg.data_options})


def build_model(cfg: SampleConfig, data: sf_data.ImageSet) -> sf_models.Denoiser:
    if cfg.model_run:
        return sf_models.load(cfg.model_run)
    return sf_models.make(cfg.model, data, **cfg.model_options)


def sample_labels(cfg: SampleConfig, data: sf_data.ImageSet, model: sf_models.Denoiser) -> torch.Tensor | None:
    if cfg.labels is not None:
        labels = torch.as_tensor(cfg.labels, dtype=torch.int64)
        if len(labels) == 1:
            labels = labels.expand(cfg.n)
        if len(labels) != cfg.n:
            raise ValueError(f"{len(labels)} labels given for {cfg.n} samples")
        if not getattr(model, "conditional", False):
            raise ValueError(f"labels (--labels) were given but '{cfg.model}' is unconditional (make it "
                             "conditional: --conditional, or drop --labels)")
        return _check_labels(labels, data)
    if getattr(model, "conditional", False):
        if data.num_classes == 0:
            raise ValueError(f"model '{cfg.model}' is conditional but dataset '{cfg.data}' has no labels")
        return torch.arange(cfg.n) % data.num_classes
    return None


def _batch_name(i: int) -> str:
    return f"batches/batch-{i:04d}.npz"


def _saved_config(run: RunDir) -> SampleConfig:
    """The SampleConfig saved in a sampling run, or one error naming what does not fit (another kind of run,
    an unknown key)."""
    kind = run.config.get("kind")
    if kind != "sample":
        raise RunError(f"{run.path} is a '{kind}' run, not a sampling run; resume it with its own command")
    saved = {k: v for k, v in run.config.items() if k != "kind"}
    known = {f.name for f in fields(SampleConfig)}
    unknown = [k for k in saved if k not in known]
    if unknown:
        named = ", ".join(f"'{k}'{closest(k, known)}" for k in unknown)
        raise RunError(f"{run.file('config.json')} has unknown key(s) {named}")
    return SampleConfig(**saved)


def resume_differences(saved: SampleConfig, given: SampleConfig | None) -> list[str]:
    """'field saved → given' for every field that `given` sets away from the defaults and the saved run differs
    in (batch_size is safe to change only before any batch is finished, so it is compared too)."""
    if given is None:
        return []
    default = SampleConfig()
    out = []
    for f in fields(SampleConfig):
        value, before = getattr(given, f.name), getattr(saved, f.name)
        if value != getattr(default, f.name) and value != before and f.name != "model":
            out.append(f"{f.name} {before!r} → {value!r}")
    return out


def check_sampling_config(cfg: SampleConfig) -> None:
    """The sampling options alone (no data, no model): counts, sampler name and keys, η."""
    for key in ("n", "steps", "batch_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} (--{key.replace('_', '-')}) must be a positive integer, got {value!r}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{cfg.sampler}'{closest(cfg.sampler, SAMPLERS)}; available: "
                         f"{', '.join(sorted(SAMPLERS))}")
    problem = unknown_options(cfg.sampler_options, SAMPLERS[cfg.sampler], skip=SAMPLER_CALL_ARGUMENTS)
    if problem:
        raise ValueError(f"sampler '{cfg.sampler}' (--sampler-opt): {problem}")
    eta = cfg.sampler_options.get("eta")
    if eta is not None and not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta (--eta) must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    get_schedule(cfg.schedule)


def check_sampling_memory(cfg: SampleConfig, data: sf_data.ImageSet) -> None:
    """Refuse a run whose arrays (samples, per-batch trajectories) would not fit in free memory."""
    pixels = data.channels * data.height * data.width
    batch = min(cfg.batch_size, cfg.n)
    per_batch = batch * pixels * 4 * (3 + (2 * (cfg.steps + 1) if cfg.save_trajectory else 0))
    estimate = max(per_batch, cfg.n * pixels * 4 * 4)       # the batches, then samples + nearest + noise
    estimate += cfg.steps * 8 * 4                           # the time grid and its ᾱ, σ in float64
    check_fits(estimate, "cpu", f"sampling {cfg.n} images of {pixels} pixels over {cfg.steps} steps",
               "lower --n, --steps or --batch-size, or drop --save-trajectory")


def _check_labels(labels: torch.Tensor, data: sf_data.ImageSet) -> torch.Tensor:
    if data.num_classes and ((labels < 0) | (labels >= data.num_classes)).any():
        bad = sorted({int(v) for v in labels[(labels < 0) | (labels >= data.num_classes)]})
        raise ValueError(f"labels (--labels) {bad} are outside the dataset's classes 0…{data.num_classes - 1}")
    return labels


def run_sampling(cfg: SampleConfig | None = None, root: str | Path = "runs", name: str | None = None,
                 resume: str | Path | None = None, progress: bool = True, shard: str = "seeds",
                 device: str | torch.device | None = None) -> RunDir:
    """Sample `cfg.n` images with `cfg.model` trained on / built from `cfg.data`; returns the run directory.

    Everything is checked (names, option keys, ranges, labels against the model, memory) before the run
    directory is created. resume: an existing run directory of this job; its saved config is used and its
    finished batches are kept. A `cfg` given with `resume` must agree with the saved one in every field it
    sets away from the defaults (`resume_differences`); a difference is refused with the list.
    shard: under torchrun, 'seeds' (whole batches dealt to the ranks; the files are those of one process) or
    'bank' (every rank holds a shard of the machine's training images; `scorefield.distributed`);
    device: where the model samples (default its own device; `networks.run_device`); files are saved from the CPU.
    """
    shard = distributed.check_shard(shard)
    if resume is not None:
        run = distributed.shared_run(lambda: RunDir.open(resume).lock())
        try:
            saved = distributed.on_writer(lambda: _saved_config(run))
            differ = resume_differences(saved, cfg)
            if differ:
                raise RunError(f"cannot resume {run.path} with different options: {'; '.join(differ)} "
                               "(start a new run, or resume without them)")
        except BaseException:
            run.release()
            raise
        cfg = saved
    else:
        if cfg is None:
            raise ValueError("run_sampling needs a SampleConfig (or resume=RUN)")
        run = None
    check_sampling_config(cfg)
    cfg = with_training_data(cfg)
    data = sf_data.load(cfg.data, **cfg.data_options)
    model = build_model(cfg, data)
    dev = run_device(model, device)
    if shard == "bank":
        distributed.shard_bank(model)
    labels = sample_labels(cfg, data, model)
    guidance = guidance_of(cfg, model)
    check_sampling_memory(cfg, data)
    if cfg.model_run:  # record what was actually sampled, not the default machine name
        cfg = replace(cfg, model=str(model.config.get("name", model.name)))
    if run is None:
        run = distributed.shared_run(
            lambda: RunDir.create("sample", asdict(cfg), root=root, name=name, seed=cfg.seed).lock())
    if guidance is not None and distributed.is_writer() and not run.exists("guidance.json"):
        sched = get_schedule(cfg.schedule)
        grid = default_grid(sched, cfg.steps, cfg.sampler)
        lo, hi = guidance.alpha_bar_window(sched, grid)
        run.write_json("guidance.json", {"scale": guidance.scale, "window": cfg.guidance_window,
                                         "alpha_bar_window": [lo, hi], "steps_covered": guidance.steps(sched, grid),
                                         "steps": cfg.steps})
    image_shape = (data.channels, data.height, data.width)
    seeds = [cfg.seed + i for i in range(cfg.n)]
    starts = list(range(0, cfg.n, cfg.batch_size))
    done = distributed.on_writer(lambda: [run.exists(_batch_name(b)) for b in range(len(starts))])
    pending = [b for b in range(len(starts)) if not done[b]]     # finished before an interruption: kept
    bar = tqdm(total=len(starts), initial=len(starts) - len(pending), desc=f"sampling {cfg.model} on {cfg.data}",
               unit="batch", disable=not progress)

    def compute(b: int) -> dict[str, Any]:
        start = starts[b]
        batch_seeds = seeds[start:start + cfg.batch_size]
        noise = initial_noise(len(batch_seeds), image_shape, seeds=batch_seeds)
        batch_labels = None if labels is None else labels[start:start + cfg.batch_size].to(dev)
        recorder = TrajectoryRecorder() if cfg.save_trajectory else None
        tic = time.perf_counter()
        out = sample(model, noise.to(dev), steps=cfg.steps, sampler=cfg.sampler, schedule=cfg.schedule,
                     labels=batch_labels, seeds=batch_seeds, guidance=guidance,
                     callback=recorder, progress=progress, **cfg.sampler_options)
        arrays: dict[str, Any] = {"samples": out.cpu(), "seeds": np.array(batch_seeds), "noise": noise}
        if batch_labels is not None:
            arrays["labels"] = batch_labels.cpu()
        if recorder is not None:
            arrays["trajectory_x"] = torch.stack(recorder.x, 1).cpu()      # [b, steps, C, H, W]
            arrays["trajectory_x0_hat"] = torch.stack(recorder.x0_hat, 1).cpu()
        return {"arrays": arrays, "engine": distributed.drain_engine_log(model), "n": len(batch_seeds),
                "seconds": time.perf_counter() - tic}

    def save(b: int, done_batch: dict[str, Any]) -> None:   # rank 0 (every batch, whichever rank sampled it)
        run.save_arrays(_batch_name(b), **done_batch["arrays"])
        distributed.record_engine_entries(run, done_batch["engine"], batch=b)
        run.log_metrics(batch=b, n=done_batch["n"], seconds=done_batch["seconds"])
        tensorboard_log.log(run, b, prefix="sampling/", n=done_batch["n"], seconds=done_batch["seconds"])
        bar.update(1)

    distributed.run_units(pending, compute, save, split_work=shard == "seeds", what="batches")
    bar.close()
    if distributed.is_writer():
        finish_run(run, data)
    distributed.barrier()
    return run.release()


def collect_batches(run: RunDir) -> dict[str, np.ndarray]:
    """Concatenate the batch files of a sampling run in order."""
    files = sorted((run.path / "batches").glob("batch-*.npz"))
    if not files:
        raise RunError(f"{run.path} holds no finished sample batches")
    parts = [run.load_arrays(str(f.relative_to(run.path))) for f in files]
    keys = [k for k in parts[0] if k in ("samples", "seeds", "labels", "noise")]
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def finish_run(run: RunDir, data: sf_data.ImageSet) -> dict[str, Any]:
    """Write samples.npz, the memorization table and the figures from the finished batches."""
    arrays = collect_batches(run)
    samples = torch.from_numpy(arrays["samples"]).float()
    index, distance = nearest_training_images(samples, data)
    if not run.exists("samples.npz"):
        run.save_arrays("samples", **arrays, nearest_index=index, nearest_rms_distance=distance)
    rows = [{"sample": i, "seed": int(arrays["seeds"][i]), "nearest_training_index": int(index[i]),
             "rms_distance": float(distance[i]),
             **({"label": int(arrays["labels"][i])} if "labels" in arrays else {})} for i in range(len(samples))]
    summary = {"n": len(samples), "median_rms_distance": float(distance.median()),
               "max_rms_distance": float(distance.max()),
               "fraction_memorized(rms<0.01)": float((distance < 0.01).double().mean()),
               "engine": engine_log.summarize(run)}
    # each final file is written atomically and on its own, so a run killed between two of them resumes
    if not (run.exists("memorization.csv") and run.exists("memorization.md")):
        run.save_table("memorization", rows, replace=True,
                       title="Nearest training image of each sample (RMS per pixel)")
    if not run.exists("nearest.png"):
        show = min(len(samples), 16)
        titles = [f"#{i}\nd = {d:.3f}" for i, d in enumerate(distance[:show].tolist())]
        shown = f"all {len(samples)} samples" if show == len(samples) else f"the first {show} of {len(samples)}"
        run.save_figure("nearest", image_grid_figure(
            [samples[:show], data.images[index[:show]]], row_titles=["sample", "nearest\ntraining\nimage"],
            col_titles=titles, title=f"Each sample over its nearest training image ({shown}); d = RMS distance "
                                     "per pixel (images in [−1, 1]; d ≈ 0: memorized)"))
    if not run.exists("samples.png"):
        run.save_figure("samples", grid_figure(samples, title=f"{len(samples)} samples (row by row from #0)"))
    if not run.exists("summary.json"):                        # last: its presence marks a finished run
        tensorboard_log.log_summary(run, summary)
        run.write_json("summary.json", summary)
    return summary
