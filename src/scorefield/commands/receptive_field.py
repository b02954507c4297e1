"""`scorefield receptive-field`: effective receptive fields of a trained run or of any registered denoiser
(kamb-ganguli Fig. 4 left) as heat maps, a size table and a size figure in a run directory."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._args import add_data_arguments, add_model_arguments, data_options, model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receptive-field", help="effective receptive fields of a denoiser (kamb-ganguli Fig. 4)",
                       description="Mean |∂ x̂₀(centre) / ∂ x| over noisy inputs at several ᾱ, with the radius "
                                   "and square size holding 90% of the gradient mass. Give a training run "
                                   "directory, or --model NAME --data NAME for any registered denoiser.")
    p.add_argument("target", nargs="?", default=None, metavar="RUN",
                   help="a training run directory (else use --model and --data)")
    add_model_arguments(p, default="is")
    add_data_arguments(p, default=None)
    g = p.add_argument_group("analysis")
    g.add_argument("--alpha-bars", default=None, help="comma-separated ᾱ values (default: 6 times of the schedule)")
    g.add_argument("--n", type=int, default=16, help="noisy inputs per ᾱ (default 16)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mass", type=float, default=0.9, help="gradient mass the size must hold (default 0.9)")
    g.add_argument("--method", default="auto", choices=["auto", "autograd", "fd"])
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--noise-only", action="store_true", help="pure N(0, I) inputs instead of noised data")
    g.add_argument("--out", default="runs", help="parent folder of the run directory (default runs)")
    g.add_argument("--name", default=None, help="run directory name")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _load_target(args: argparse.Namespace):
    """(model, data or None, description) from a run directory or from --model/--data."""
    import scorefield as sf

    from ..runs import RunDir

    run_path = args.target or args.model_run
    if run_path is not None:
        model = sf.models.load(run_path)
        spec = dict(RunDir.open(run_path).config.get("data", {}))
        if args.data is not None:
            spec = {"name": args.data, **data_options(args)}
        data = sf.data.load(**spec) if spec.get("name") else None
        return model, data, f"{model.config.get('name')} {Path(run_path).name}"
    if args.data is None:
        raise ValueError("give a training RUN directory, or --model NAME with --data NAME")
    data = sf.data.load(args.data, **data_options(args))
    model = sf.models.make(args.model, data, **model_options(args))
    return model, data, f"{args.model} on {data.name}"


def run(args: argparse.Namespace) -> int:
    from ..analysis.receptive_field import receptive_field, save_receptive_field
    from ..runs import RunDir

    model, data, description = _load_target(args)
    alpha_bars = None if args.alpha_bars is None else [float(a) for a in args.alpha_bars.split(",") if a.strip()]
    labels = None
    if getattr(model, "conditional", False) and data is not None and data.num_classes:
        labels = torch.arange(args.n) % data.num_classes
    result = receptive_field(model, alpha_bars, n=args.n, seed=args.seed, data=None if args.noise_only else data,
                             labels=labels, method=args.method, mass=args.mass, batch_size=args.batch_size,
                             progress=not args.no_progress)
    config = {"target": args.target or args.model_run, "model": getattr(model, "config", {}),
              "data": None if data is None else data.name, "alpha_bars": result.alpha_bars.tolist(), "n": args.n,
              "seed": args.seed, "mass": args.mass, "method": result.method, "noise_only": args.noise_only}
    out = RunDir.create("receptive-field", config, root=args.out, name=args.name, seed=args.seed)
    save_receptive_field(result, out, title=description)
    print((out.path / "receptive_field.md").read_text())
    print(f"run directory: {out.path}")
    return 0
