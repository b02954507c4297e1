"""`scorefield data list` and `scorefield data info NAME ...`: what datasets exist and what one holds."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .. import data as sfdata
from ..data.grid import save_image_grid
from ._args import parse_key_values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list datasets, or describe one",
                                   description="List the registered datasets or describe one of them.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    listing = sub.add_parser("list", help="list the registered datasets and their options")
    listing.set_defaults(func=run_list)

    info = sub.add_parser("info", help="load a dataset and print n, shape, range, class counts, provenance")
    info.add_argument("name", help="dataset name (see `scorefield data list`)")
    info.add_argument("--split", default="train", help="split to load (default: train)")
    info.add_argument("--subset", type=int, default=None, help="keep N images drawn with --data-seed")
    info.add_argument("--data-seed", dest="seed", type=int, default=0,
                      help="seed for --subset and generated data (default 0), as in every other command")
    info.add_argument("--seed", dest="seed", type=int, help=argparse.SUPPRESS)      # the former name
    info.add_argument("--root", default=None, help="folder holding the files (mnist-idx, fashion-mnist, "
                                                   "cifar10, folder)")
    info.add_argument("--classes", default=None, help="labels to keep, e.g. 3 or 3,5")
    info.add_argument("--binarize", type=float, default=None, metavar="T", help="threshold → ±1")
    info.add_argument("--channels", type=int, default=None, choices=(1, 3), help="1 grey, 3 RGB")
    info.add_argument("--pad-to", type=int, default=None, metavar="S", help="pad to S×S with −1")
    info.add_argument("--size", type=int, default=None, help="image size (generated sets, natural, folder)")
    info.add_argument("--n", type=int, default=None, help="number of images (generated sets, natural)")
    info.add_argument("--data-opt", dest="option", action="append", default=[], metavar="KEY=VALUE",
                      help="any other loader option, value read as JSON when possible (e.g. --data-opt "
                           "exponent=1.5), as in every other command")
    info.add_argument("-o", "--option", dest="option", action="append", help=argparse.SUPPRESS)  # former name
    info.add_argument("--grid", default=None, metavar="OUT.png",
                      help="also save a grid of the first images (and OUT.npz with their values)")
    info.add_argument("--grid-count", type=int, default=64, help="images in the grid (default 64)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=run_info)


def parse_classes(text: str) -> int | list[int]:
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--classes must be labels separated by commas, e.g. 3,5; got '{text}'") from exc
    if not labels:
        raise ValueError("--classes needs at least one label")
    return labels[0] if len(labels) == 1 and "," not in text else labels


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The loader options the user gave (options not given are left to the loader's defaults)."""
    options = parse_key_values(args.option, "--data-opt")
    given = {"root": args.root, "binarize": args.binarize, "channels": args.channels, "pad_to": args.pad_to,
             "size": args.size, "n": args.n,
             "classes": parse_classes(args.classes) if args.classes is not None else None}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def _short(value: Any, limit: int = 8) -> Any:
    """Provenance values for the screen: long lists (a stored dictionary) become a size note."""
    if isinstance(value, list) and (len(value) > limit or any(isinstance(v, list) for v in value)):
        return f"<list of {len(value)}>"
    return value


def _provenance_lines(key: str, value: Any, indent: str = "  ") -> list[str]:
    """One line per entry; a nested dict (a sampler's diagnostics) indented below its key, floats to 4 digits."""
    if isinstance(value, dict):
        if all(not isinstance(v, (dict, list)) for v in value.values()) and len(value) <= 4:
            inner = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
            return [f"{indent}{key}: {inner}"]
        lines = [f"{indent}{key}:"]
        for k, v in value.items():
            lines.extend(_provenance_lines(k, v, indent + "  "))
        return lines
    return [f"{indent}{key}: {value:.4g}" if isinstance(value, float) else f"{indent}{key}: {_short(value)}"]


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"dataset     {summary['name']}",
             f"images      {summary['n']}",
             f"shape       [{summary['channels']}, {summary['height']}, {summary['width']}]  (C, H, W)"]
    if summary["n"]:
        lines.append(f"range       [{summary['min']:.4g}, {summary['max']:.4g}], mean {summary['mean']:.4g}")
    if "class_counts" in summary:
        names = summary.get("class_names") or [str(i) for i in range(len(summary["class_counts"]))]
        counts = ", ".join(f"{name}: {count}" for name, count in zip(names, summary["class_counts"], strict=False))
        lines.append(f"classes     {summary['num_classes']} ({counts})")
    else:
        lines.append("classes     unlabelled")
    lines.append("provenance")
    for key, value in summary["provenance"].items():
        if key == "operations":
            value = "; ".join(value)
        lines.extend(_provenance_lines(key, value))
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    for name in sfdata.available_datasets():
        doc = (sfdata.get_loader(name).__doc__ or "").strip().splitlines()
        options = ", ".join(sfdata.loader_options(name)) or "-"
        print(f"{name:18s} {doc[0] if doc else ''}")
        print(f"{'':18s} options: {options}")
    print(f"shared options: subset, seed, {', '.join(sorted(sfdata._SHARED_OPTIONS))}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    data = sfdata.load(args.name, split=args.split, subset=args.subset, seed=args.seed,
                       **options_from_args(args))
    summary = data.summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.grid:
        png, npz = save_image_grid(data, args.grid, count=args.grid_count)
        print(f"grid        {png} (values in {npz})")
    return 0
