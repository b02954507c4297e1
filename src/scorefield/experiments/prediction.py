"""Predict a denoiser sample by sample with analytic theories (kamb-ganguli Tables 1–2, Fig. 1, Fig. 10).

The same seeds, the same labels and the same sampler run through the network and through every theory; each
theory's final samples are scored against the network's with `sf.analysis.agreement` (r², the coefficient of
determination, is the headline; Pearson r beside it). The run directory holds:

    config.json                     every option, the patch schedule of each theory
    samples/<name>.npz              final samples of the network and of each theory (written as each finishes:
                                    an interrupted run resumes with `resume=RUN` and redoes none of them)
    agreement.csv / .md             the paper-format table: per theory median r² with quartiles, Pearson r,
                                    fraction of samples where it beats IS
    per_sample.csv / .md            r² and Pearson r of every theory on every sample (the numbers behind figures)
    scatter.png                     each theory's r² against the IS baseline's, one dot per sample
    grid-XX.png                     network / theory / … / IS, 16 samples per page, each with its r² below
    summary.json                    headline numbers, the network samples' value range, the engine routes used
    engine.jsonl                    which route, implementation and device served every engine call, with bounds
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed, tensorboard_log
from ..analysis.compare import agreement, agreement_table, per_sample_rows
from ..data import ImageSet
from ..models import Denoiser, ModelConfigError, make
from ..models.machines import PatchSchedule, calibrated_patch_schedule
from ..runs import RunDir, RunError, jsonable
from ..sampling import initial_noise, sample
from . import engine_log
from .calibration import PATCH_MACHINES, Calibration
from .networks import denoiser_padding, describe_denoiser, matched_conditioning, resolve_labels, run_device

NETWORK = "network"
PAGE = 16


@dataclass
class PredictResult:
    table: list[dict[str, Any]]                 # one row per theory (agreement_table)
    per_sample: list[dict[str, Any]]            # one row per sample
    scores: dict[str, dict[str, torch.Tensor]]  # theory -> {"r2": [N], "pearson": [N]}
    samples: dict[str, torch.Tensor]            # "network" and each theory -> [N, C, H, W]
    run_dir: Path


def default_theories(padding: str) -> list[str]:
    """IS (memorization baseline), LS and the equivariant machine that fits the boundary."""
    return ["is", "ls", "els" if padding == "circular" else "bbels"]


def resolve_patch_schedule(schedule_from: Any, schedule: str = "cosine") -> PatchSchedule | int | None:
    """A Calibration, a calibration run directory, a list of sizes (lowest noise first, the paper's listing),
    or an int, as something `make(patch_size=...)` takes."""
    if schedule_from is None or isinstance(schedule_from, (int, PatchSchedule)):
        return schedule_from
    if isinstance(schedule_from, Calibration):
        return schedule_from.patch_schedule()
    if isinstance(schedule_from, (str, Path)):
        return Calibration.load(schedule_from).patch_schedule()
    sizes = [int(p) for p in schedule_from]
    return calibrated_patch_schedule(sizes, schedule)


def warn_if_calibrated_on(schedule_from: Any, seeds: Sequence[int]) -> None:
    """Warn when the schedule was calibrated on some of the seeds it now predicts (an in-sample fit; the
    paper calibrates on held-out trajectories, and `scorefield predict` holds its calibration seeds out)."""
    if not isinstance(schedule_from, Calibration):
        return
    shared = sorted(set(schedule_from.seeds) & set(int(s) for s in seeds))
    if shared:
        warnings.warn(f"the schedule was calibrated on {len(shared)} of the predicted seeds ({shared[:5]}"
                      f"{' …' if len(shared) > 5 else ''}): those samples are fitted, not predicted; calibrate "
                      f"on other seeds (e.g. seeds=range(100_000, 100_032))", stacklevel=3)


def _build_theory(theory: str | Denoiser, data: ImageSet, padding: str, patch: Any,
                  options: dict[str, Any]) -> tuple[str, Denoiser]:
    if isinstance(theory, Denoiser):
        return describe_denoiser(theory)["name"], theory
    name = str(theory)
    if name in PATCH_MACHINES:
        if patch is None and "patch_size" not in options:
            raise ModelConfigError(f"theory '{name}' needs a patch-size schedule: pass schedule_from= (a "
                                   f"calibration, its run directory or a list of sizes) or a patch_size option")
        return name, make(name, data, **{"padding": padding, "patch_size": patch, **options})
    return name, make(name, data, **options)


def predict(network: Denoiser, data: ImageSet, theories: Sequence[str | Denoiser] | None = None,
            schedule_from: Any = None, seeds: Sequence[int] = range(100), steps: int = 20,
            schedule: str = "cosine", sampler: str = "ddim", padding: str | None = None,
            labels: Sequence[int] | None = None, clip_x0: bool = True, baseline: str = "is",
            theory_options: dict[str, dict[str, Any]] | None = None, batch_size: int = 50,
            out: str | Path = "runs", name: str | None = None, resume: str | Path | None = None,
            progress: bool = True, network_spec: dict[str, Any] | None = None,
            data_spec: dict[str, Any] | None = None, calibration_run: str | None = None,
            shard: str = "seeds", network_steps: int | None = None,
            device: str | torch.device | None = None) -> PredictResult:
    """Sample `network` and each theory from the same seeds and score every theory against the network.

    theories: registry names or Denoiser objects (default IS, LS and bbELS or ELS by the network's padding);
    schedule_from: the patch-size schedule of the patch machines (a Calibration, its run directory, or a list
    of sizes lowest noise first); theory_options: extra `make` options per theory name; clip_x0: clip x̂₀ to
    [−1, 1] in the sampler for every denoiser (a no-op for the machines); resume: an interrupted run directory;
    shard: under torchrun, 'seeds' (each rank samples a contiguous share of the seeds of every denoiser, rank 0
    gathers and writes them) or 'bank' (the machines' training images split over the ranks);
    network_steps: sampler steps of the network alone (default `steps`), from the same initial noise on the same
    schedule. kamb-ganguli (App. B) sample the theories with 20 steps and the CNN with 20 and with 150, and
    find that the 150-step network matches the 20-step theories better. device: where the network and the
    theories sample (default the network's device; `networks.run_device`); samples are saved from the CPU.
    """
    padding = padding or denoiser_padding(network)
    theories = list(theories) if theories is not None else default_theories(padding)
    seeds = [int(s) for s in seeds]
    if not seeds or steps < 1 or not theories or (network_steps is not None and network_steps < 1):
        raise ModelConfigError(f"need seeds, steps ≥ 1, network_steps ≥ 1 and theories; got {len(seeds)} seeds, "
                               f"{steps} steps, network_steps {network_steps}, theories {theories}")
    if isinstance(schedule_from, (str, Path)):                     # a calibration run directory: read it once
        schedule_from = Calibration.load(schedule_from)
    warn_if_calibrated_on(schedule_from, seeds)
    patch = resolve_patch_schedule(schedule_from, schedule)
    theory_options = dict(theory_options or {})
    built = [_build_theory(t, data, padding, patch, matched_conditioning(
        network, str(t), dict(theory_options.get(str(t), {})))) for t in theories]
    names = [n for n, _ in built]
    if len(set(names)) != len(names) or NETWORK in names:
        raise ModelConfigError(f"theory names must be distinct and not '{NETWORK}', got {names}")
    label_tensor = resolve_labels(network, labels, len(seeds), data)
    dev = run_device(network, device)
    if label_tensor is not None:
        label_tensor = label_tensor.to(dev)
    if distributed.check_shard(shard) == "bank":
        built = [(n, distributed.shard_bank(m) if distributed.bank_splittable(m) else m) for n, m in built]
    config = {"network": network_spec or describe_denoiser(network), "theories": {
        n: describe_denoiser(m)["config"] for n, m in built}, "seeds": seeds, "steps": steps,
        "network_steps": None if network_steps is None else int(network_steps), "schedule": schedule,
        "sampler": sampler, "padding": padding, "clip_x0": bool(clip_x0), "baseline": baseline,
        "labels": None if label_tensor is None else label_tensor.tolist(), "calibration_run": calibration_run,
        "data": data_spec or {"name": data.name, "n": len(data)}}
    run = distributed.shared_run(lambda: _open_run(resume, config, out, name))
    noise = initial_noise(len(seeds), (data.channels, data.height, data.width), seeds=seeds).to(dev)
    samples: dict[str, torch.Tensor] = {}
    for label, model in tqdm([(NETWORK, network), *built], desc="predict", unit="denoiser", disable=not progress):
        n_steps = network_steps if label == NETWORK and network_steps is not None else steps
        samples[label] = _samples_of(run, label, model, noise, seeds, label_tensor, batch_size,
                                     dict(steps=n_steps, sampler=sampler, schedule=schedule, clip_x0=clip_x0),
                                     split=shard == "seeds")
    result = distributed.on_writer(lambda: _score(run, samples, names, seeds, label_tensor, baseline))
    run.release()
    return result


def _open_run(resume: str | Path | None, config: dict[str, Any], out: str | Path, name: str | None) -> RunDir:
    run = (RunDir.open(resume) if resume is not None else RunDir.create("predict", config, root=out, name=name)).lock()
    if resume is not None:
        _check_resume(run, config)
    return run


def _check_resume(run: RunDir, config: dict[str, Any]) -> None:
    """Refuse (and release) a resume whose options differ from the saved run's, listing them; the network and
    data are described, not compared (the caller passes them again)."""
    saved = run.config
    wanted = json.loads(json.dumps(jsonable(config)))                 # as it would have been saved
    differ = [k for k in wanted if k not in ("network", "data", "calibration_run") and saved.get(k) != wanted[k]]
    if saved.get("kind") != "predict" or differ:
        run.release()
        what = (f"it is a '{saved.get('kind')}' run" if saved.get("kind") != "predict" else
                "options differ from the saved run: " + "; ".join(f"{k} {saved.get(k)!r} → {wanted[k]!r}"
                                                                   for k in differ))
        raise RunError(f"cannot resume {run.path} as a prediction: {what}")


def _samples_of(run: RunDir, label: str, model: Denoiser, noise: torch.Tensor, seeds: list[int],
                labels: torch.Tensor | None, batch_size: int, sampling: dict[str, Any],
                split: bool = False) -> torch.Tensor | None:
    """One denoiser's samples [N, C, H, W] (on rank 0; None on the others). split: each rank samples a contiguous
    share of the seeds and rank 0 gathers them in seed order and writes the file."""
    path = f"samples/{label}.npz"
    if distributed.on_writer(lambda: run.exists(path)):                # finished before an interruption
        return torch.from_numpy(run.load_arrays(path)["samples"]) if distributed.is_writer() else None
    tic = time.perf_counter()
    mine = distributed.split_positions(len(seeds)) if split else list(range(len(seeds)))
    parts = []
    for start in range(0, len(mine), batch_size):
        sl = slice(mine[start], mine[min(start + batch_size, len(mine)) - 1] + 1)
        parts.append(sample(model, noise[sl], labels=None if labels is None else labels[sl], seeds=seeds[sl],
                            **sampling))
    done = [(torch.cat(parts).cpu(), distributed.drain_engine_log(model))]
    done = distributed.gather_objects(done[0]) if split else done
    if not distributed.is_writer():
        return None
    out = torch.cat([part for part, _ in done])
    run.save_arrays(path, samples=out, seeds=np.asarray(seeds))
    for _, entries in done:
        distributed.record_engine_entries(run, entries, denoiser=label)
    run.log_metrics(denoiser=label, seconds=time.perf_counter() - tic, n=len(seeds))
    return out


def _score(run: RunDir, samples: dict[str, torch.Tensor], names: list[str], seeds: list[int],
           labels: torch.Tensor | None, baseline: str) -> PredictResult:
    net = samples[NETWORK]
    scores = {n: agreement(net, samples[n]) for n in names}
    table = agreement_table(scores, baseline=baseline)
    rows = per_sample_rows(scores, seeds, None if labels is None else labels.tolist())
    run.save_table("agreement", table, replace=True, title="Agreement of each theory with the network, per "
                   "sample (r² = coefficient of determination; Pearson r beside it)")
    run.save_table("per_sample", rows, replace=True)
    summary = {"median_r2": {r["theory"]: r["r2_median"] for r in table},
               "median_pearson": {r["theory"]: r["pearson_median"] for r in table},
               "network_sample_min": float(net.min()), "network_sample_max": float(net.max()), "n": len(seeds),
               "engine": engine_log.summarize(run)}
    from ..analysis.prediction_figures import comparison_grid, scatter_vs_baseline

    if baseline in scores and len(names) > 1:
        run.save_figure("scatter", scatter_vs_baseline(scores, baseline), replace=True)
    for page, start in enumerate(range(0, len(seeds), PAGE)):
        run.save_figure(f"grid-{page:02d}", comparison_grid(samples, scores, names, start, PAGE), replace=True)
    tensorboard_log.log_summary(run, summary)
    run.write_json("summary.json", summary, replace=True)           # last: its presence marks a finished run
    return PredictResult(table=table, per_sample=rows, scores=scores, samples=samples, run_dir=run.path)
