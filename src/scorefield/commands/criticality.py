"""`scorefield criticality`: correlation length, mode softening, ξ_eq and every critical-time estimate along the
reverse process of a denoiser (criticality paper, ambrogioni-phase-transitions-full.txt, App. A, B, E–G)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ._network import add_network_arguments, labels_of, load_network, machine_inputs


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..analysis.criticality import CORRELATION_METHODS, DEFAULT_SMOOTHING, DRIFTS, SOFTENING_METHODS
    from ..experiments.criticality_run import GRIDS, ROUTES
    from ..sampling import available_samplers
    from ..schedules import SCHEDULES

    p = subparsers.add_parser(
        "criticality", help="correlation length, mode softening and critical times along the reverse process",
        description="Run N reverse trajectories of a network (RUN: a training run or a pretrained run directory; "
                    "--pretrained) or an analytic machine (--model with --data; for --model dictionary on "
                    "--data patch-dictionary the dictionary and priors of the data are used) and write ξ_x(t), "
                    "−dξ_x/d log t, the drift's directional derivatives along Fourier modes, ξ_eq(t), the "
                    "figures (Fig. 2/3/5–7 of the paper), the data behind them and a table of every "
                    "critical-time estimate (theory and measured). Paper reproduction (App. E.13): "
                    "scorefield criticality --model dictionary --data patch-dictionary --data-opt size=80")
    add_network_arguments(p)
    g = p.add_argument_group("trajectories")
    g.add_argument("--n", type=int, default=4, help="trajectories (noise seeds 0..N-1; default 4, App. E.13)")
    g.add_argument("--steps", type=int, default=2000, help="grid steps (default 2000, App. E.5)")
    g.add_argument("--t-max", type=float, default=None,
                   help="first time (default the schedule's t_max: 50 for constant, App. E.5)")
    g.add_argument("--t-min", type=float, default=1e-3, help="last time (default 1e-3)")
    g.add_argument("--grid", default="log-tau", choices=GRIDS,
                   help="time grid: log-tau (default: eq. 59's log grid in τ = −log ᾱ, the paper's clock, on any "
                        "schedule; the log grid in t on a constant one), log (in the schedule's t), uniform")
    g.add_argument("--sampler", default="sde", choices=available_samplers(),
                   help="sampler (default sde: Euler–Maruyama on the reverse SDE, eq. 60)")
    g.add_argument("--schedule", default=None, choices=sorted(SCHEDULES),
                   help="noise schedule (default the network's own, else constant β = 1)")
    g.add_argument("--labels", default=None, help="comma-separated class labels (conditional networks)")
    g.add_argument("--route", default="auto", choices=ROUTES,
                   help="auto: a dictionary machine as its exact convolutional form, a network through its ε̂ "
                        "in float64; machine: the denoiser call itself")
    a = p.add_argument_group("analysis")
    a.add_argument("--softening-every", type=int, default=4,
                   help="drift analysis at every k-th grid time (default 4; 1 = all)")
    a.add_argument("--method", default="finite_difference", choices=SOFTENING_METHODS,
                   help="directional derivatives: symmetric finite difference (E.8, default) or exact JVP")
    a.add_argument("--shells", type=int, default=6, help="Fourier shells n ≤ SHELLS (default 6, E.9)")
    a.add_argument("--drift", default="reverse_sde", choices=DRIFTS, help="which drift to linearize")
    a.add_argument("--correlation", default="binary", choices=CORRELATION_METHODS,
                   help="ξ_x estimator: binary (E.6) or continuous (G.3)")
    a.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"Gaussian width in log t before dξ/d log t (default {DEFAULT_SMOOTHING})")
    a.add_argument("--patch-size", type=int, default=None,
                   help="P of the theory's |Ω| = P² and data patch covariance (default the model's, else 5)")
    a.add_argument("--stationary-data", choices=["yes", "no"], default=None,
                   help="Λ from the power spectrum (translation-invariant data) or the full covariance")
    a.add_argument("--snapshot-times", default=None, help="comma-separated times of the snapshot figure")
    a.add_argument("--tc-range", default=None, metavar="LO,HI",
                   help="also report the argmax of the median ξ_eq within LO ≤ t ≤ HI (analysis only: may change "
                        "on --resume, like --n and --smoothing)")
    o = p.add_argument_group("output")
    o.add_argument("--part-size", type=int, default=1, help="trajectories per saved part (default 1)")
    o.add_argument("--out", default="runs", help="folder for run directories (default runs/)")
    o.add_argument("--name", default=None, help="run directory name")
    o.add_argument("--resume", default=None, metavar="RUN_DIR", help="finish an interrupted run directory")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _dictionary_machine(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """--model dictionary: the machine of the data's own dictionary (patch-dictionary records its patterns and
    priors), in float64, unless --model-opt gives patterns."""
    import torch

    import scorefield as sf

    data, options, spec = machine_inputs(args)
    provenance = getattr(data, "provenance", None) or {}
    if "patterns" not in options and "dictionary" in provenance:
        options["patterns"] = torch.tensor(provenance["dictionary"], dtype=torch.float32)
        options["priors"] = torch.tensor(provenance["priors"], dtype=torch.float64)
    options.setdefault("dtype", "float64")
    network = sf.models.make("dictionary", data, **options)
    shown = {k: v for k, v in options.items() if k not in ("patterns", "priors")}
    if "patterns" in options:
        shown["patterns"] = f"{len(options['patterns'])} patterns" + (" (the data's dictionary)"
                                                                       if "dictionary" in provenance else "")
    return network, data, {"model": "dictionary", "options": shown}, spec


def run(args: argparse.Namespace) -> int:
    from ..experiments.criticality_run import criticality_run

    if args.model == "dictionary":
        network, data, spec, data_spec = _dictionary_machine(args)
    else:
        network, data, spec, data_spec = load_network(args)
    spec = {**spec, "data": data_spec}
    snapshot_times = (None if args.snapshot_times is None
                      else [float(v) for v in args.snapshot_times.split(",") if v.strip()])
    stationary = None if args.stationary_data is None else args.stationary_data == "yes"
    tc_range = None
    if args.tc_range is not None:
        try:
            lo, hi = (float(v) for v in args.tc_range.split(","))
        except ValueError:
            raise ValueError(f"--tc-range takes LO,HI (two times), got {args.tc_range!r}") from None
        tc_range = (lo, hi)
    run_dir = criticality_run(
        network, (data.channels, data.height, data.width), n=args.n, schedule=args.schedule, t_max=args.t_max,
        t_min=args.t_min, steps=args.steps, grid=args.grid, sampler=args.sampler,
        softening_every=args.softening_every, method=args.method, shells=args.shells, drift=args.drift,
        correlation=args.correlation, smoothing=args.smoothing, part_size=args.part_size, labels=labels_of(args),
        data=data, patch_size=args.patch_size, stationary_data=stationary, snapshot_times=snapshot_times,
        route=args.route, out=args.out, name=args.name, resume=args.resume, progress=not args.no_progress,
        model_spec=spec, tc_range=tc_range)
    print(run_dir.file("critical_times.md").read_text())
    summary = run_dir.read_json("summary.json")
    print(json.dumps({"n": summary["n"], "seconds": summary["seconds"], "route": summary["route"],
                      "t_c_two_state": summary["t_c_two_state"],
                      "measured": {k: v["t"] for k, v in summary["measured"].items()}}, indent=2))
    print(f"run directory: {run_dir.path}")
    return 0
