"""Information spreading along the reverse process of any denoiser, as a resumable run directory (EFT paper).

The ensemble is recorded in parts of `part_size` samples (seeds 0..n−1, the same for every model), each saved as
parts/part-XXX.npz the moment it finishes, so an interrupted run resumes with `resume=RUN` and loses no part.
Then the parts are merged and analysed. The run directory holds

    config.json                 every option (model, data, times, steps, anchors, ...)
    parts/part-XXX.npz          streamed two-point moments of each part (`analysis.information.Trajectory`)
    trajectory.npz              all parts merged
    two_point.csv               t, ᾱ, separation, ρ, its bootstrap error, I, its error: the numbers behind the figures
    collapse.csv / .md          collapse numbers of ρ and I against |x−y| and against |x−y|²/ᾱ, over all
                                times and over the early ones (ᾱ ≤ EARLY_ALPHA_BAR), where the theory applies
    collapse_profile.csv        the collapse number over sliding windows of times (where the diffusive regime holds)
    information.png, rho.png    I and ρ against |x−y| and against |x−y|²/ᾱ_t (the paper's Fig. 2–3, 5)
    summary.json                the headline collapse numbers and the ᾱ up to which the curves collapse
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed, tensorboard_log
from ..analysis import information as info
from ..models import Denoiser
from ..runs import RunDir, jsonable
from ..sampling import initial_noise

COLLAPSE_THRESHOLD = 0.05        # a window of curves "collapses" below this collapse number
EARLY_ALPHA_BAR = 0.25           # the diffusive regime is an early-time (small ᾱ) prediction: scored there too


def information_run(model: Denoiser, image_shape: Sequence[int], n: int = 512, times: Sequence[float] | None = None,
                    steps: int = 20, schedule: str = "cosine", sampler: str = "ddim", labels: Any = None,
                    anchors: Any = None, translation: bool | None = None, part_size: int = 128,
                    blocks_per_part: int = 4, window: int = 3, out: str | Path = "runs", name: str | None = None,
                    resume: str | Path | None = None, progress: bool = True,
                    model_spec: dict[str, Any] | None = None) -> RunDir:
    """Record `n` reverse trajectories of `model` (noise seeds 0..n−1), compute ρ and I against separation at the
    recorded `times`, their collapse numbers and figures; returns the run directory.

    translation: use the translation average (circular models) or the anchor pixels (default: translation
    when the model's padding is circular, anchors otherwise)."""
    if n < 2 or part_size < 1:
        raise ValueError(f"n (--n) must be at least 2 and part_size positive, got n={n}, part_size={part_size}")
    config = {"model": model_spec or {"name": getattr(model, "name", type(model).__name__)},
              "image_shape": list(image_shape), "n": int(n), "times": None if times is None else list(times),
              "steps": int(steps), "schedule": schedule, "sampler": sampler, "labels": labels,
              "anchors": anchors, "translation": translation, "part_size": int(part_size),
              "blocks_per_part": int(blocks_per_part), "window": int(window)}
    run = distributed.shared_run(lambda: _open(resume, config, out, name))
    parts = [(start, min(start + part_size, n)) for start in range(0, n, part_size)]
    names = [f"parts/part-{k:03d}.npz" for k in range(len(parts))]
    done = distributed.on_writer(lambda: [run.exists(name) for name in names])
    pending = [k for k in range(len(parts)) if not done[k]]          # finished before an interruption: kept
    bar = tqdm(total=len(parts), initial=len(parts) - len(pending), desc="information", unit="part",
               disable=not progress)

    def compute(k: int) -> info.Trajectory:
        start, stop = parts[k]
        noise = initial_noise(stop - start, image_shape, seeds=range(start, stop))
        return info.record(model, noise, times=times, steps=steps, schedule=schedule, sampler=sampler,
                           labels=_slice_labels(labels, start, stop), anchors=anchors,
                           blocks=min(blocks_per_part, stop - start), seeds=list(range(start, stop)),
                           progress=False)

    def save(k: int, part: info.Trajectory) -> None:
        path = run.file(names[k])
        path.parent.mkdir(exist_ok=True)
        part.save(path)
        bar.update(1)

    # under torchrun the parts are dealt to the ranks (seed split); rank 0 saves each and analyses
    distributed.run_units(pending, compute, save, what="parts")
    bar.close()
    with distributed.writer_only() as writing:
        if writing:
            traj = None
            for name in names:                                            # in seed order, as one process would
                part = info.Trajectory.load(run.file(name))
                traj = part if traj is None else traj.merge(part)
            traj.save(run.file("trajectory.npz"))
            _analyse(run, traj, _uses_translation(model, translation), window)
            run.release()
    return run


def _open(resume: str | Path | None, config: dict[str, Any], out: str | Path, name: str | None) -> RunDir:
    if resume is None:
        return RunDir.create("information", config, root=out, name=name).lock()
    run = RunDir.open(resume).lock()
    wanted = json.loads(json.dumps(jsonable(config)))                 # as it would have been saved
    changed = sorted(k for k in wanted if k != "model" and run.config.get(k) != wanted[k])
    if changed:
        run.release()
        raise ValueError(f"resume {resume}: options differ from the saved run: "
                         + ", ".join(f"{k} {run.config.get(k)!r} → {wanted[k]!r}" for k in changed))
    return run


def _slice_labels(labels: Any, start: int, stop: int) -> Any:
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    return labels.expand(stop)[start:stop] if labels.numel() == 1 else labels[start:stop]


def _uses_translation(model: Any, translation: bool | None) -> bool:
    if translation is not None:
        return bool(translation)
    config = getattr(model, "config", {}) or {}
    return config.get("padding") == "circular"


def _analyse(run: RunDir, traj: info.Trajectory, translation: bool, window: int) -> None:
    res = info.two_point(traj, anchors=None if translation else "recorded")
    rows = [{"t": float(res.t[i]), "alpha_bar": float(res.alpha_bar[i]), "separation": float(r),
             "rho": float(res.rho[i, j]), "rho_err": float(res.rho_err[i, j]),
             "mi": float(res.mi[i, j]), "mi_err": float(res.mi_err[i, j])}
            for i in range(len(res.t)) for j, r in enumerate(res.separation)]
    run.save_table("two_point", rows, replace=True)
    table, profile_rows, summary = [], [], {"method": res.method, "n": res.n}
    for quantity in ("rho", "mi"):
        numbers = {v: _safe(info.collapse, res, v, quantity) for v in ("r", "r2_over_alpha_bar")}
        early = {v: _safe(info.collapse, res, v, quantity, None, (0.0, EARLY_ALPHA_BAR))
                 for v in ("r", "r2_over_alpha_bar")}
        table.append({"quantity": quantity, "times": "all", "collapse_vs_r": numbers["r"],
                      "collapse_vs_r2_over_alpha_bar": numbers["r2_over_alpha_bar"]})
        table.append({"quantity": quantity, "times": f"ᾱ ≤ {EARLY_ALPHA_BAR}", "collapse_vs_r": early["r"],
                      "collapse_vs_r2_over_alpha_bar": early["r2_over_alpha_bar"]})
        summary[f"collapse_{quantity}"] = numbers
        summary[f"collapse_{quantity}_early"] = early
        try:
            profile = info.collapse_by_time(res, "r2_over_alpha_bar", window=window, quantity=quantity)
        except info.InformationError:
            continue
        summary[f"diffusive_until_alpha_bar_{quantity}"] = profile.holds_until(COLLAPSE_THRESHOLD)
        profile_rows += [{"quantity": quantity, "alpha_bar_lo": float(lo), "alpha_bar_hi": float(hi),
                          "collapse_vs_r2_over_alpha_bar": float(s)}
                         for s, lo, hi in zip(profile.score, profile.alpha_bar_lo, profile.alpha_bar_hi, strict=True)]
    run.save_table("collapse", table, replace=True, title="Collapse numbers (mean spread across curves / range of "
                   "the mean curve; 0 = the curves coincide)")
    if profile_rows:
        run.save_table("collapse_profile", profile_rows, replace=True)
    for quantity, figure in (("mi", "information"), ("rho", "rho")):
        try:
            run.save_figure(figure, info.information_figure(res, quantity=quantity), replace=True)
        except info.InformationError:
            pass
    summary["collapse_threshold"], summary["early_alpha_bar"] = COLLAPSE_THRESHOLD, EARLY_ALPHA_BAR
    tensorboard_log.log_summary(run, summary)
    run.write_json("summary.json", summary, replace=True)


def _safe(fn: Any, *args: Any) -> float:
    try:
        return float(fn(*args))
    except info.InformationError:
        return float("nan")


__all__ = ["COLLAPSE_THRESHOLD", "information_run"]
