"""`scorefield sample`: draw samples from any denoiser into a run directory (the main job)."""
from __future__ import annotations

import argparse
import json

from ..experiments.sample_run import SampleConfig, run_sampling
from ..sampling import available_samplers
from ..schedules import SCHEDULES
from ._args import (
    add_data_arguments,
    add_model_arguments,
    data_options,
    model_options,
    parse_int_list,
    parse_key_values,
)
from ._distributed import add_shard_argument, writer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="sample from a denoiser (analytic machine or trained network) into a run directory",
        description="Sample from a denoiser and write a run directory with the samples, a grid, the nearest "
                    "training image of each sample and its distance (memorization check).")
    add_model_arguments(p)
    add_data_arguments(p, default=None)
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    g.add_argument("--steps", type=int, default=20, help="number of steps (default 20)")
    g.add_argument("--sampler", default="ddim", choices=available_samplers(), help="sampler (default ddim)")
    g.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="noise schedule")
    g.add_argument("--eta", type=float, default=None, help="DDIM stochasticity η (default 0)")
    g.add_argument("--sampler-opt", action="append", metavar="KEY=VALUE", help="any other sampler option")
    g.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    g.add_argument("--device", default=None, help="where the model samples: cpu | cuda (default cpu)")
    g.add_argument("--labels", default=None, help="comma-separated class labels for a conditional model")
    g.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance x̂₀(∅) + W·(x̂₀(y) − x̂₀(∅)); needs a conditional model "
                        "(analytic machines: labels=None is the machine over every class)")
    g.add_argument("--guidance-window", default=None, metavar="[VAR:]MIN:MAX",
                   help="guide only inside a window (a guidance pulse) in ᾱ (default VAR), sigma, t, step or "
                        "fraction, e.g. 0.2:0.6, sigma:0.5:2, step:5:9; an end may be empty; default everywhere")
    g.add_argument("--batch-size", type=int, default=16, help="samples per batch (each batch is saved)")
    g.add_argument("--save-trajectory", action="store_true", help="also save x and x̂₀ at every step")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs", help="folder for run directories (default runs/)")
    o.add_argument("--name", default=None, help="run directory name (default sample-<time>)")
    o.add_argument("--resume", default=None, metavar="RUN", help="finish an interrupted run directory")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_shard_argument(p)
    p.set_defaults(func=run)


def _refuse_process_runs(model_run: str | None) -> None:
    """A network trained under a component process (sf.forward) denoises that process, not the standard one."""
    if not model_run:
        return
    from pathlib import Path

    config = Path(model_run) / "config.json"
    try:
        process = (json.loads(config.read_text()).get("training") or {}).get("process")
    except (OSError, ValueError):
        return                                            # the loader reports unreadable runs
    if process:
        raise ValueError(f"{model_run} was trained under the forward process {process.get('name')!r}, whose reverse "
                         f"this command does not run: draw its samples with  scorefield train --resume {model_run} "
                         "--samples N  or in Python with sf.forward.load_run and sf.sampling.sample(..., process=)")


def run(args: argparse.Namespace) -> int:
    _refuse_process_runs(args.model_run)
    sampler_options = parse_key_values(args.sampler_opt, "--sampler-opt")
    if args.eta is not None:
        sampler_options["eta"] = args.eta
    cfg = SampleConfig(
        model=args.model, model_options=model_options(args), model_run=args.model_run,
        data=args.data or (None if args.model_run else "digits"),
        data_options=data_options(args), n=args.n, steps=args.steps, sampler=args.sampler,
        schedule=args.schedule, sampler_options=sampler_options, seed=args.seed,
        labels=None if args.labels is None else _as_list(parse_int_list(args.labels, "--labels")),
        batch_size=args.batch_size, save_trajectory=args.save_trajectory, guidance=args.guidance,
        guidance_window=_window(args.guidance_window))
    if args.resume is not None and cfg.data_options == {"split": "train", "seed": 0}:
        cfg.data_options = {}                     # the CLI's defaults: not a request to change the saved run
    run_dir = run_sampling(cfg, root=args.out, name=args.name, resume=args.resume, progress=not args.no_progress,
                           shard=args.shard, device=args.device)
    if not writer():
        return 0
    summary = run_dir.read_json("summary.json")
    if run_dir.exists("guidance.json"):
        g = run_dir.read_json("guidance.json")
        print(f"guidance ×{g['scale']} at sampler steps {g['steps_covered']} of 0…{g['steps'] - 1} "
              f"(ᾱ in [{g['alpha_bar_window'][0]:.4g}, {g['alpha_bar_window'][1]:.4g}])")
    print(f"run directory: {run_dir.path}")
    print(json.dumps(summary, indent=2))
    return 0


def _window(text: str | None) -> dict | None:
    if text is None:
        return None
    parts = text.split(":")
    variable = parts.pop(0) if len(parts) == 3 else "alpha_bar"
    try:
        lo, hi = (None if v == "" else float(v) for v in parts)
    except ValueError:
        raise ValueError(f"--guidance-window must be [VAR:]MIN:MAX (e.g. 0.2:0.6 or sigma:0.5:2), "
                         f"got {text!r}") from None
    return {"variable": variable, "min": lo, "max": hi}


def _as_list(value: int | list[int]) -> list[int]:
    return value if isinstance(value, list) else [value]
