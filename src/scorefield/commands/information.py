"""`scorefield information`: how information spreads along the reverse process of a denoiser (EFT paper):
ρ and the Gaussian mutual information against separation at chosen times, and their curve collapse."""
from __future__ import annotations

import argparse
import json

from ._network import add_network_arguments, labels_of, load_network


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..sampling import available_samplers
    from ..schedules import SCHEDULES

    p = subparsers.add_parser(
        "information", help="pixel-to-pixel correlation and mutual information along the reverse process",
        description="Record N reverse trajectories of a network (RUN, --pretrained) or an analytic machine "
                    "(--model with --data), and write ρ and I = −½ log(1 − ρ²) against |x−y| and |x−y|²/ᾱ at "
                    "the chosen times, with bootstrap errors, collapse numbers and figures.")
    add_network_arguments(p)
    g = p.add_argument_group("information")
    g.add_argument("--n", type=int, default=512, help="trajectories (noise seeds 0..N-1; default 512)")
    g.add_argument("--times", default=None, help="comma-separated times t in (0, 1] of the sampler grid "
                                                    "(nearest step; default every step)")
    g.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    g.add_argument("--sampler", default="ddim", choices=available_samplers(), help="sampler (default ddim)")
    g.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="noise schedule")
    g.add_argument("--anchors", default=None, help="anchor pixels 'y,x;y,x' for models without translation "
                                                   "symmetry (default: centre and near a corner)")
    g.add_argument("--translation", choices=["yes", "no"], default=None,
                   help="translation-average (circular models) or use the anchors (default: from the padding)")
    g.add_argument("--labels", default=None, help="comma-separated class labels (conditional models)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs", help="folder for run directories (default runs/)")
    o.add_argument("--name", default=None, help="run directory name")
    o.add_argument("--part-size", type=int, default=128,
                   help="trajectories per saved part (an interrupted run loses at most one part; default 128)")
    o.add_argument("--resume", default=None, metavar="RUN_DIR", help="finish an interrupted run directory")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _anchors(text: str | None) -> list[list[int]] | None:
    if text is None:
        return None
    try:
        return [[int(v) for v in pair.split(",")] for pair in text.split(";") if pair.strip()]
    except ValueError:
        raise ValueError(f"--anchors must look like 'y,x;y,x', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..experiments.information_run import information_run

    try:
        times = None if args.times is None else [float(v) for v in args.times.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--times takes comma-separated times in (0, 1], got {args.times!r}") from None
    network, data, spec, _ = load_network(args)
    translation = None if args.translation is None else args.translation == "yes"
    run_dir = information_run(network, (data.channels, data.height, data.width), n=args.n, times=times,
                              steps=args.steps, schedule=args.schedule, sampler=args.sampler,
                              labels=labels_of(args), anchors=_anchors(args.anchors), translation=translation,
                              part_size=args.part_size, out=args.out, name=args.name, resume=args.resume,
                              progress=not args.no_progress, model_spec=spec)
    print(json.dumps(run_dir.read_json("summary.json"), indent=2))
    print(f"run directory: {run_dir.path}")
    return 0
