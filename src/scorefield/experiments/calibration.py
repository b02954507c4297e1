"""Calibrate a local machine's patch size against a denoiser, step by step (kamb-ganguli App. C.2, Fig. 4 middle).

The network (any denoiser) runs its own reverse trajectories from the calibration seeds. At every sampler step
i, on the network's own state x_i at the query time t_i, the machine is evaluated at every candidate patch size
P, and the noise it implies, ε̂_P = (x_i − √ᾱ·x̂₀_P)/√(1−ᾱ), is compared with the network's ε̂ by cosine
similarity per sample. The best size of a sample is the arg-max; the scale of step i is the median of the
per-sample best sizes (the lower median for an even count, so it is always a candidate).

Index convention: the scale chosen at step i belongs to the noise level ᾱ(t_i) at which the network was queried
at step i (not to the step's end point; the released code stores step i at index i−1 and reads it at i).
`Calibration.patch_schedule()` maps exactly those ᾱ to their sizes; `Calibration.patch_sizes` lists them from
the lowest noise to the highest, the order the paper and `sf.models.make(patch_size=[...])` use.

A step where every candidate gives the same ε̂ for a sample (the flat first step from pure noise, where every
machine returns its bank's prior mean) cannot identify a size: such samples have no best size, and a step where
no sample has one takes the size of the nearest step that does (`undetermined` lists these steps).

Every machine call is recorded in engine.jsonl (route, implementation, device, certified bounds; `engine_log`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import convert, distributed, tensorboard_log
from ..data import ImageSet
from ..models import Denoiser, ModelConfigError, make
from ..models.machines import PatchSchedule
from ..runs import RunDir, RunError
from ..sampling import initial_noise, sample
from . import engine_log
from .networks import denoiser_padding, describe_denoiser, matched_conditioning, resolve_labels, run_device

PATCH_MACHINES = ("ls", "els", "bbels")
TIE_TOLERANCE = 1e-7      # candidate cosines closer than this (for one sample) do not pick a size
CAL_SEED_START = 100_000  # default calibration seeds start here, away from the predicted seeds 0..N-1


@dataclass
class Calibration:
    """A calibrated patch-size schedule. Arrays are indexed by sampler step i from pure noise (step 0) on."""

    machine: str
    padding: str
    candidate_sizes: list[int]
    times: list[float]                  # [S] query time t_i of step i
    alpha_bars: list[float]             # [S] ᾱ(t_i)
    chosen: list[int]                   # [S] the size of step i (median of per-sample best sizes)
    cosine: np.ndarray                  # [S, K, N] cosine similarity of ε̂ (machine at size k vs network)
    best: np.ndarray                    # [S, N] best size of each sample (0: undetermined)
    undetermined: list[int] = field(default_factory=list)
    machine_options: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    seeds: list[int] = field(default_factory=list)   # the calibration seeds (keep them out of a prediction's)

    @property
    def patch_sizes(self) -> list[int]:
        """The calibrated sizes from the lowest noise to the highest (the paper's listing order)."""
        return list(reversed(self.chosen))

    def patch_schedule(self) -> PatchSchedule:
        """P as a function of ᾱ: the size chosen at the query ᾱ nearest to the asked one."""
        return PatchSchedule(self.chosen, self.alpha_bars)

    def build(self, data: ImageSet, machine: str | None = None, **options: Any) -> Denoiser:
        """The multi-scale machine (`machine`, default the calibrated one) with this schedule, on `data`."""
        opts = {"padding": self.padding, **self.machine_options, **options}
        return make(machine or self.machine, data, patch_size=self.patch_schedule(), **opts)

    def table(self) -> list[dict[str, Any]]:
        """One row per step: step, t, ᾱ, chosen P, and the quartiles of the per-sample best sizes."""
        rows = []
        for i in range(len(self.chosen)):
            valid = self.best[i][self.best[i] > 0]
            q = np.percentile(valid, [25, 75]) if valid.size else [np.nan, np.nan]
            rows.append({"step": i, "t": self.times[i], "alpha_bar": self.alpha_bars[i],
                         "patch_size": self.chosen[i], "best_q25": float(q[0]), "best_q75": float(q[1]),
                         "samples_determined": int(valid.size), "mean_best_cosine": float(
                             self.cosine[i].max(0).mean())})
        return rows

    @classmethod
    def load(cls, run_dir: str | Path) -> Calibration:
        """A calibration saved in a run directory (by `calibrate`)."""
        run = RunDir.open(run_dir)
        if not run.exists("calibration.npz"):
            raise RunError(f"{run.path} holds no finished calibration (calibration.npz); resume it with "
                           f"`scorefield calibrate --resume {run.path}`")
        z = run.load_arrays("calibration")
        cfg = run.config
        return cls(machine=cfg["machine"], padding=cfg["padding"], candidate_sizes=[int(v) for v in z["sizes"]],
                   times=z["times"].tolist(), alpha_bars=z["alpha_bars"].tolist(),
                   chosen=[int(v) for v in z["chosen"]], cosine=z["cosine"], best=z["best"],
                   undetermined=[int(v) for v in z["undetermined"]],
                   machine_options=cfg.get("machine_options", {}), run_dir=run.path,
                   seeds=[int(v) for v in cfg.get("seeds", [])])


def _check_sizes(patch_sizes: Sequence[int]) -> list[int]:
    sizes = sorted({int(p) for p in patch_sizes})
    if not sizes or any(p < 1 or p % 2 == 0 for p in sizes):
        raise ModelConfigError(f"candidate patch sizes must be odd positive integers, got {list(patch_sizes)}")
    return sizes


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, ...] × [B, ...] → [B] cosine similarity in float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def choose_sizes(cosine: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, list[int], list[int]]:
    """cosine [S, K, N] → (best [S, N] (0 where undetermined), chosen [S], undetermined steps)."""
    sizes_arr = np.asarray(sizes)
    spread = cosine.max(1) - cosine.min(1)                          # [S, N]
    best = np.where(spread > TIE_TOLERANCE, sizes_arr[cosine.argmax(1)], 0)
    chosen: list[int | None] = []
    for row in best:
        valid = np.sort(row[row > 0])
        chosen.append(int(valid[(valid.size - 1) // 2]) if valid.size else None)   # lower median
    undetermined = [i for i, c in enumerate(chosen) if c is None]
    known = [i for i, c in enumerate(chosen) if c is not None]
    if not known:
        raise ModelConfigError("no step could tell the candidate patch sizes apart (every machine gave the "
                               "same output); use more steps or a noisier-to-cleaner grid")
    for i in undetermined:
        nearest = min(known, key=lambda j: (abs(j - i), -j))
        chosen[i] = chosen[nearest]
    return best, [int(c) for c in chosen], undetermined


def calibrate(network: Denoiser, data: ImageSet, machine: str | None = None,
              patch_sizes: Sequence[int] = range(3, 29, 2),
              seeds: Sequence[int] = range(CAL_SEED_START, CAL_SEED_START + 32), steps: int = 20,
              schedule: str = "cosine", sampler: str = "ddim", padding: str | None = None,
              labels: Sequence[int] | None = None, clip_x0: bool = True,
              machine_options: dict[str, Any] | None = None, out: str | Path = "runs", name: str | None = None,
              resume: str | Path | None = None, progress: bool = True,
              network_spec: dict[str, Any] | None = None, data_spec: dict[str, Any] | None = None,
              shard: str = "seeds", device: str | torch.device | None = None) -> Calibration:
    """Calibrate `machine` ('bbels' for zero padding, 'els' for circular by default; or 'ls') against
    `network` on the bank `data`; writes a run directory and returns the `Calibration`.

    seeds: calibration seeds (one trajectory each; by default 100,000… so that a prediction of seeds 0..N-1
    does not predict the trajectories it was calibrated on; `predict` warns when they overlap);
    steps/schedule/sampler: the network's sampler; clip_x0:
    clip x̂₀ to [−1, 1] in the sampler (see `sf.sampling.clipped`); padding: the machine's (default the
    network's); resume: an interrupted calibration run directory (finished steps are kept); shard: under
    torchrun, 'seeds' (each rank runs a contiguous share of the seeds, rank 0 gathers every step) or 'bank'
    (every rank runs every seed, the machines' training images split over the ranks; `scorefield.distributed`);
    device: where the network and the machines run (default the network's device; `networks.run_device`).
    """
    padding = padding or denoiser_padding(network)
    machine = machine or ("els" if padding == "circular" else "bbels")
    if machine not in PATCH_MACHINES:
        raise ModelConfigError(f"calibration needs a patch machine ({', '.join(PATCH_MACHINES)}), got '{machine}'")
    sizes = _check_sizes(patch_sizes)
    seeds = [int(s) for s in seeds]
    if not seeds or steps < 1:
        raise ModelConfigError(f"need at least one seed and one step, got {len(seeds)} seeds, {steps} steps")
    machine_options = matched_conditioning(network, machine, dict(machine_options or {}))
    config = {"machine": machine, "padding": padding, "patch_sizes": sizes, "seeds": seeds, "steps": steps,
              "schedule": schedule, "sampler": sampler, "clip_x0": bool(clip_x0), "machine_options": machine_options,
              "labels": None if labels is None else [int(v) for v in labels],
              "network": network_spec or describe_denoiser(network), "data": data_spec or {"name": data.name,
                                                                                           "n": len(data)}}
    # build everything that can refuse the input before a run directory exists
    machines = {p: make(machine, data, patch_size=p, padding=padding, **machine_options) for p in sizes}
    label_tensor = resolve_labels(network, labels, len(seeds), data)
    dev = run_device(network, device)
    if distributed.check_shard(shard) == "bank":
        for m in machines.values():
            distributed.shard_bank(m)
    mine = (distributed.split_positions(len(seeds), what="calibration seeds") if shard == "seeds"
            else list(range(len(seeds))))
    run = distributed.shared_run(lambda: _open_run(resume, config, out, name))
    noise = initial_noise(len(seeds), (data.channels, data.height, data.width), seeds=seeds)[mine].to(dev)
    labels_mine = None if label_tensor is None else label_tensor[mine].to(dev)
    record = _StepRecorder(run, machines, labels_mine, steps, progress, gather=shard == "seeds")
    tic = time.perf_counter()
    sample(network, noise, steps=steps, sampler=sampler, schedule=schedule, labels=labels_mine,
           seeds=[seeds[i] for i in mine], callback=record, clip_x0=clip_x0)
    record.close()
    return distributed.on_writer(lambda: _finish(run, config, record, time.perf_counter() - tic))


def _open_run(resume: str | Path | None, config: dict[str, Any], out: str | Path, name: str | None) -> RunDir:
    if resume is None:
        return RunDir.create("calibrate", config, root=out, name=name).lock()
    run = RunDir.open(resume).lock()
    saved = {k: v for k, v in run.config.items() if k != "kind"}
    differ = [k for k in config if k not in ("network", "data") and saved.get(k) != config[k]]
    if differ:
        run.release()
        raise RunError(f"cannot resume {run.path}: options differ from the saved run: " + ", ".join(
            f"{k} {saved.get(k)!r} → {config[k]!r}" for k in differ))
    return run


class _StepRecorder:
    """Sampler callback: at each step, every candidate machine on the network's state; one file per step, so
    an interrupted calibration resumes without redoing finished steps. gather: this rank holds a share of the
    seeds; rank 0 gathers every rank's cosines (in seed order) and writes the step."""

    def __init__(self, run: RunDir, machines: dict[int, Denoiser], labels: torch.Tensor | None, steps: int,
                 progress: bool, gather: bool = False) -> None:
        self.run, self.machines, self.labels, self.gather = run, machines, labels, gather
        self.times: list[float] = []
        self.alpha_bars: list[float] = []
        self.cosine: list[np.ndarray] = []
        self.bar = tqdm(total=steps * len(machines), desc="calibrate", unit="size", disable=not progress,
                        dynamic_ncols=True)

    def __call__(self, info: dict[str, Any]) -> None:
        if info["x0_hat"] is None:
            return
        step, x, x0_net = info["step"], info["x"], info["x0_hat"]
        ab = torch.full((x.shape[0],), float(info["alpha_bar"]), dtype=x.dtype, device=x.device)
        path = f"steps/step-{step:03d}.npz"
        if distributed.on_writer(lambda: self.run.exists(path)):
            cos = self.run.load_arrays(path)["cosine"] if distributed.is_writer() else None
            self.bar.update(len(self.machines))
        else:
            eps_net = convert.eps_from_x0(x, x0_net, ab)
            rows = []
            for x0 in self._denoise_all(x, ab):
                eps = convert.eps_from_x0(x, x0, ab)
                rows.append(cosine_per_sample(eps, eps_net).cpu().numpy())
            cos = self._save(path, np.stack(rows), info)                    # [K, N] (rank 0)
        self.times.append(float(info["t"]))
        self.alpha_bars.append(float(info["alpha_bar"]))
        self.cosine.append(cos)

    def _denoise_all(self, x: torch.Tensor, ab: torch.Tensor) -> list[torch.Tensor]:
        """x̂₀ of every candidate machine, in candidate order: the sizes the first machine's one-pass route
        covers (`PatchMachine.denoise_sizes`: every size from one pass over the bank, logged as one
        'box-multisize' engine call) from one call, the others one call per size."""
        one_pass = getattr(next(iter(self.machines.values())), "denoise_sizes", None)
        outs = one_pass(x, ab, self.labels, list(self.machines)) if one_pass is not None else {}
        self.bar.update(len(outs))
        for size, machine in self.machines.items():
            if size not in outs:
                outs[size] = machine(x, ab, self.labels)
                self.bar.update(1)
        return [outs[size] for size in self.machines]

    def _save(self, path: str, cos: np.ndarray, info: dict[str, Any]) -> np.ndarray | None:
        """Write the step (rank 0: every rank's cosines [K, n_r], joined in seed order, and engine calls)."""
        logs = [(size, distributed.drain_engine_log(m)) for size, m in self.machines.items()]
        parts = distributed.gather_objects((cos, logs)) if self.gather else [(cos, logs)]
        if not distributed.is_writer():
            return None
        cos = np.concatenate([c for c, _ in parts], axis=1)
        self.run.save_arrays(path, cosine=cos, t=info["t"], alpha_bar=info["alpha_bar"])
        for _, rank_logs in parts:
            for size, entries in rank_logs:
                distributed.record_engine_entries(self.run, entries, step=info["step"], candidate_size=size)
        return cos

    def close(self) -> None:
        self.bar.close()


def _finish(run: RunDir, config: dict[str, Any], record: _StepRecorder, seconds: float) -> Calibration:
    sizes = config["patch_sizes"]
    cosine = np.stack(record.cosine)                                 # [S, K, N]
    best, chosen, undetermined = choose_sizes(cosine, sizes)
    cal = Calibration(machine=config["machine"], padding=config["padding"], candidate_sizes=sizes,
                      times=record.times, alpha_bars=record.alpha_bars, chosen=chosen, cosine=cosine, best=best,
                      undetermined=undetermined, machine_options=config["machine_options"], run_dir=run.path,
                      seeds=list(config["seeds"]))
    run.save_arrays("calibration", replace=True, sizes=np.asarray(sizes), times=np.asarray(cal.times),
                    alpha_bars=np.asarray(cal.alpha_bars), chosen=np.asarray(chosen), cosine=cosine, best=best,
                    undetermined=np.asarray(undetermined, dtype=np.int64))
    run.save_table("schedule", cal.table(), replace=True,
                   title=f"Calibrated {cal.machine} patch size per sampler step (step 0 = pure noise)")
    from ..analysis.calibration_figure import calibration_figure

    run.save_figure("schedule", calibration_figure(cal), replace=True)
    for step, row in enumerate(cal.table()):                          # P(t) per sampler step, for TensorBoard
        tensorboard_log.log(run, step, prefix="calibrate/", patch_size=row["patch_size"],
                            mean_best_cosine=row["mean_best_cosine"])
    summary = {"patch_sizes_lowest_noise_first": cal.patch_sizes, "undetermined_steps": undetermined,
               "seconds": seconds, "engine": engine_log.summarize(run)}
    tensorboard_log.log_summary(run, summary)
    run.write_json("summary.json", summary, replace=True)             # last: marks it finished
    run.release()
    return cal
