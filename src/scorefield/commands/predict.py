"""`scorefield predict`: predict a network sample by sample with analytic theories (kamb-ganguli Tables 1–2).
With no network given, this is the main job: the bundled MNIST ResNet against bbELS, LS and IS."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..experiments.calibration import CAL_SEED_START
from ._args import parse_key_values
from ._distributed import add_shard_argument, writer
from ._network import add_network_arguments, add_sampling_arguments, labels_of, load_network, parse_sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="compare a network with analytic theories sample by sample (the main job)",
        description="Sample the network and each theory from the same seeds; write the agreement table "
                    "(median r² and Pearson r, fraction beating IS), per-sample numbers, a scatter and image "
                    "grids. Without --schedule-from or --patch-sizes the machine is calibrated first.")
    add_network_arguments(p)
    g = p.add_argument_group("prediction")
    g.add_argument("--theories", default=None, help="comma-separated theories (default is,ls,bbels or "
                   "is,ls,els by the network's padding): any registered model, e.g. the local score machines "
                   "and wiener, pca-locality, cfdm, pspc, topk, nearest")
    g.add_argument("--theory-opt", action="append", metavar="THEORY:KEY=VALUE",
                   help="an option of one theory, e.g. topk:k=50, pspc:patch_size=5, pca-locality:tau=0.05 "
                   "(repeatable)")
    g.add_argument("--seeds", type=int, default=16, help="samples, seeds 0..N-1 (default 16; the paper 100)")
    g.add_argument("--schedule-from", default=None, metavar="CAL_RUN", help="a calibration run directory")
    g.add_argument("--patch-sizes", default=None, help="a patch-size schedule, lowest noise first, e.g. the "
                   "paper's 3,3,5,5,5,7,7,7,9,9,11,11,11,11,13,15,15,15,15,15")
    g.add_argument("--cal-seeds", type=int, default=4, help="calibration seeds when calibrating (default 4)")
    g.add_argument("--cal-seed-start", type=int, default=CAL_SEED_START, help="first calibration seed "
                   f"(default {CAL_SEED_START:,}): the calibration runs on held-out seeds S..S+N-1, never on "
                   "the predicted ones")
    g.add_argument("--sizes", default="3:15", help="candidate sizes when calibrating (default 3:15)")
    add_sampling_arguments(p)
    p.add_argument("--network-steps", type=int, default=None, help="sampler steps of the network alone "
                   "(default --steps); the paper also samples its CNNs with 150 steps against 20-step theories")
    add_shard_argument(p)
    p.set_defaults(func=run)


def parse_theory_options(items: list[str] | None, theories: list[str] | None) -> dict[str, dict[str, Any]]:
    """['topk:k=50', 'pspc:patch_size=5'] -> {"topk": {"k": 50}, "pspc": {"patch_size": 5}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        name, sep, option = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--theory-opt expects THEORY:KEY=VALUE, got '{item}'")
        name = name.strip()
        if theories is not None and name not in theories:
            raise ValueError(f"--theory-opt names '{name}', which is not among --theories {','.join(theories)}")
        out.setdefault(name, {}).update(parse_key_values([option], "--theory-opt"))
    return out


def check_before_work(args: argparse.Namespace, theories: list[str] | None) -> None:
    """Refuse a bad seed count or an unknown theory before anything is loaded or calibrated."""
    from ..models import MODELS
    from ..options import closest

    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.cal_seeds < 1 or args.cal_seed_start < 0:
        raise ValueError(f"--cal-seeds must be at least 1 and --cal-seed-start at least 0, got {args.cal_seeds} "
                         f"and {args.cal_seed_start}")
    if args.cal_seed_start < args.seeds:
        raise ValueError(f"--cal-seed-start {args.cal_seed_start} would calibrate on predicted seeds "
                         f"(0..{args.seeds - 1}); it must be at least --seeds ({args.seeds})")
    if args.network_steps is not None and args.network_steps < 1:
        raise ValueError(f"--network-steps must be at least 1, got {args.network_steps}")
    for name in theories or []:
        if name not in MODELS:
            raise ValueError(f"--theories: unknown model '{name}'{closest(name, MODELS)}; available: "
                             f"{', '.join(sorted(MODELS))}")


def run(args: argparse.Namespace) -> int:
    from ..experiments.calibration import PATCH_MACHINES, calibrate
    from ..experiments.prediction import predict
    from ..runs import RunDir, markdown_table

    theories = None if args.theories is None else [t.strip() for t in args.theories.split(",") if t.strip()]
    check_before_work(args, theories)
    theory_options = parse_theory_options(args.theory_opt, theories)
    network, data, net_spec, data_spec = load_network(args)
    # the calibration run is recorded with an absolute path, so a resume finds it from any folder
    cal_run = None if args.schedule_from is None else str(Path(args.schedule_from).resolve())
    schedule_from = cal_run
    # only the local score machines take the calibrated schedule (unless given their own patch_size)
    needs_schedule = theories is None or any(t in PATCH_MACHINES and "patch_size" not in theory_options.get(t, {})
                                             for t in theories)
    resume_calibration = None
    if args.resume is not None and RunDir.open(args.resume).config.get("kind") == "calibrate":
        # interrupted while calibrating (the hint names that run): finish it, then predict from the start
        resume_calibration, args.resume = args.resume, None
    if args.patch_sizes is not None:
        schedule_from = parse_sizes(args.patch_sizes)
    elif schedule_from is None and args.resume is None and needs_schedule:
        cal_seeds = range(args.cal_seed_start, args.cal_seed_start + args.cal_seeds)
        cal = calibrate(network, data, patch_sizes=parse_sizes(args.sizes), seeds=cal_seeds,
                        steps=args.steps, schedule=args.schedule, sampler=args.sampler, labels=None,
                        clip_x0=not args.no_clip, out=args.out, name=None if args.name is None else
                        f"{args.name}-calibration", progress=not args.no_progress, network_spec=net_spec,
                        data_spec=data_spec, resume=resume_calibration, shard=args.shard, device=args.device)
        schedule_from, cal_run = cal, str(Path(cal.run_dir).resolve())
        print(f"calibrated {cal.machine} (lowest noise first): {','.join(map(str, cal.patch_sizes))}  "
              f"[{cal.run_dir}]")
    elif args.resume is not None:
        cal_run = cal_run or RunDir.open(args.resume).config.get("calibration_run")
        schedule_from = cal_run
    res = predict(network, data, theories=theories, schedule_from=schedule_from, seeds=range(args.seeds),
                  steps=args.steps, schedule=args.schedule, sampler=args.sampler, labels=labels_of(args),
                  clip_x0=not args.no_clip, theory_options=theory_options, out=args.out, name=args.name,
                  resume=args.resume, progress=not args.no_progress, network_spec=net_spec, data_spec=data_spec,
                  calibration_run=cal_run, shard=args.shard, network_steps=args.network_steps,
                  device=args.device)
    if not writer():
        return 0
    cols = [c for c in res.table[0] if c not in ("r2_q25", "r2_q75", "pearson_q25", "pearson_q75")]
    print(markdown_table(res.table, cols, title="agreement with the network (r²: coefficient of determination)"))
    net = res.samples["network"]
    print(f"network samples range: [{float(net.min()):.3f}, {float(net.max()):.3f}]")
    print(f"run directory: {res.run_dir}")
    return 0
