"""`scorefield calibrate`: the patch-size schedule P(t) of a local machine against a network (kamb-ganguli
App. C.2)."""
from __future__ import annotations

import argparse

from ..experiments.calibration import CAL_SEED_START
from ._distributed import add_shard_argument, writer
from ._network import add_network_arguments, add_sampling_arguments, labels_of, load_network, parse_sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="calibrate a machine's patch size per step against a network",
        description="Run the network's reverse trajectories; at each step pick the patch size whose machine "
                    "predicts the network's noise best (cosine similarity, median over seeds). Writes "
                    "schedule.csv/.md/.png and calibration.npz.")
    add_network_arguments(p)
    g = p.add_argument_group("calibration")
    g.add_argument("--machine", default=None, choices=["ls", "els", "bbels"],
                   help="machine to calibrate (default bbels for zero padding, els for circular)")
    g.add_argument("--sizes", default="3:27", help="candidate patch sizes, '3:27' or '3,5,7' (default 3:27)")
    g.add_argument("--seeds", type=int, default=32, help="calibration seeds S..S+N-1 (default 32)")
    g.add_argument("--seed-start", type=int, default=CAL_SEED_START, help=f"first seed S (default "
                   f"{CAL_SEED_START:,}: away from the seeds 0..N-1 that `scorefield predict` predicts)")
    add_sampling_arguments(p)
    add_shard_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments.calibration import calibrate

    if args.seeds < 1 or args.seed_start < 0:
        raise ValueError(f"--seeds must be at least 1 and --seed-start at least 0, got {args.seeds} and "
                         f"{args.seed_start}")
    network, data, net_spec, data_spec = load_network(args)
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    cal = calibrate(network, data, machine=args.machine, patch_sizes=parse_sizes(args.sizes), seeds=seeds,
                    steps=args.steps, schedule=args.schedule, sampler=args.sampler,
                    labels=labels_of(args), clip_x0=not args.no_clip, out=args.out, name=args.name,
                    resume=args.resume, progress=not args.no_progress, network_spec=net_spec, data_spec=data_spec,
                    shard=args.shard, device=args.device)
    if not writer():
        return 0
    print(f"calibrated {cal.machine} patch sizes (lowest noise first): {','.join(map(str, cal.patch_sizes))}")
    print(f"run directory: {cal.run_dir}")
    return 0
