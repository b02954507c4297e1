"""Shared by `calibrate` and `predict`: which denoiser to explain (a training run, a bundled network, or an
analytic machine standing in for one) and which data is the machines' bank (by default what it was trained on)."""
from __future__ import annotations

import argparse
from typing import Any

from ._args import add_data_arguments, data_options, model_options, parse_int_list, parse_key_values


def add_network_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None, metavar="RUN",
                   help="training run directory of the network to explain (default: the bundled network)")
    g = p.add_argument_group("network")
    g.add_argument("--pretrained", default=None, help="a bundled network (default mnist-resnet-small)")
    g.add_argument("--model", default=None, help="an analytic machine as the 'network' (with --data)")
    g.add_argument("--patch", default=None, help="patch size(s) of --model (lowest noise first)")
    g.add_argument("--padding", "--model-padding", dest="padding", default=None, choices=["zeros", "circular"],
                   help="padding of --model (the same flag as in `scorefield sample`)")
    g.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="any other option of --model")
    add_data_arguments(p, default=None)
    p.set_defaults(conditional=False)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from ..sampling import available_samplers
    from ..schedules import SCHEDULES

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    g.add_argument("--sampler", default="ddim", choices=available_samplers(), help="sampler (default ddim)")
    g.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="noise schedule")
    g.add_argument("--no-clip", action="store_true", help="do not clip x̂₀ to [-1, 1] in the sampler")
    g.add_argument("--labels", default=None, help="comma-separated class labels (conditional networks)")
    g.add_argument("--device", default=None, help="where the network and the machines run: cpu | cuda "
                   "(default cpu)")
    add_output_arguments(p)


def add_output_arguments(p: argparse.ArgumentParser, resume_help: str = "finish an interrupted run directory"
                         ) -> None:
    """--out, --name, --resume RUN_DIR and --no-progress, in an 'output' group."""
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs", help="folder for run directories (default runs/)")
    o.add_argument("--name", default=None, help="run directory name")
    o.add_argument("--resume", default=None, metavar="RUN_DIR", help=resume_help)
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_sizes(text: str) -> list[int]:
    """'3,5,7' or '3:27' (odd sizes from 3 to 27)."""
    if ":" in text:
        lo, hi = (int(v) for v in text.split(":"))
        return list(range(lo, hi + 1, 2))
    return [int(v) for v in text.split(",") if v.strip()]


def machine_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(bank data, model options, data spec) for an analytic machine standing in for a network (--model)."""
    import scorefield as sf

    if args.run or args.pretrained:
        raise ValueError("give either a network (RUN / --pretrained) or --model, not both")
    if args.data is None:
        raise ValueError("--model needs --data (the dataset the machine is built on)")
    spec = {"name": args.data, **data_options(args)}
    options = model_options(args)
    options.update(parse_key_values(args.model_opt, "--model-opt"))
    return sf.data.load(**spec), options, spec


def load_network(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(network, bank data, network spec, data spec) from the command line."""
    import scorefield as sf
    from scorefield import pretrained
    from scorefield.runs import RunDir

    if args.model is not None:
        data, options, spec = machine_inputs(args)
        network = sf.models.make(args.model, data, **options)
        return network, data, {"model": args.model, "options": options}, spec
    if args.run and args.pretrained:
        raise ValueError("give either RUN or --pretrained, not both")
    folder = args.run or pretrained.path(args.pretrained or pretrained.DEFAULT)
    network = sf.models.load(folder)
    trained_on = dict(RunDir.open(folder).config.get("data", {}))
    spec = {"name": args.data, **data_options(args)} if args.data else trained_on
    if not spec.get("name"):
        raise ValueError(f"{folder} does not record its training data by name: pass --data")
    data = sf.data.load(**spec)
    return network, data, {"run": str(folder), "name": network.config.get("name")}, spec


def labels_of(args: argparse.Namespace) -> list[int] | None:
    if args.labels is None:
        return None
    labels = parse_int_list(args.labels, "--labels")
    return labels if isinstance(labels, list) else [labels]
