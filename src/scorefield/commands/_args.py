"""Argument helpers shared by subcommands (dataset and model options)."""
from __future__ import annotations

import argparse
import json
from typing import Any


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, '[1,2]' -> [1, 2], anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def add_data_arguments(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, help=f"dataset name (see `scorefield data list`; default {default})")
    g.add_argument("--split", default="train", help="dataset split (default train)")
    g.add_argument("--subset", type=int, default=None, help="use a random subset of this many images")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the subset draw")
    g.add_argument("--root", default=None, help="folder holding the dataset files (file-based datasets)")
    g.add_argument("--classes", default=None, help="comma-separated class labels to keep")
    g.add_argument("--data-opt", action="append", metavar="KEY=VALUE",
                   help="any other loader option, e.g. --data-opt size=16 --data-opt pad_to=32")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"split": args.split, "seed": args.data_seed}
    if args.subset is not None:
        opts["subset"] = args.subset
    if args.root is not None:
        opts["root"] = args.root
    if args.classes is not None:
        classes = parse_int_list(args.classes, "--classes")
        opts["classes"] = classes if isinstance(classes, list) else [classes]
    opts.update(parse_key_values(args.data_opt, "--data-opt"))
    return opts


def parse_patch_sizes(text: str | None) -> int | list[int] | None:
    """'5' -> 5; '15,13,11' -> [15, 13, 11] (a per-step schedule)."""
    if text is None:
        return None
    return parse_int_list(text, "--patch")  # type: ignore[return-value]


def parse_int_list(text: str, flag: str) -> int | list[int]:
    """'5' -> 5; '3,5,7' -> [3, 5, 7]; anything else is one error naming the flag."""
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes an integer or comma-separated integers, got {text!r}") from None
    if not sizes:
        raise ValueError(f"{flag} takes an integer or comma-separated integers, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def add_model_arguments(p: argparse.ArgumentParser, default: str = "is") -> None:
    from ..models import available_models

    g = p.add_argument_group("model")
    g.add_argument("--model", default=default,
                   help=f"denoiser: one of {', '.join(available_models())} (default {default})")
    g.add_argument("--patch", default=None,
                   help="patch size P (odd) of a local machine, or a comma-separated per-step schedule")
    g.add_argument("--padding", default=None, choices=["zeros", "circular"], help="boundary handling")
    g.add_argument("--conditional", action="store_true", help="class-conditional model")
    g.add_argument("--model-run", default=None, help="a training run directory: sample its trained network")
    g.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="any other model option")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    patch = parse_patch_sizes(args.patch)
    if patch is not None:
        opts["patch_size"] = patch
    if args.padding is not None:
        opts["padding"] = args.padding
    if args.conditional:
        opts["conditional"] = True
    opts.update(parse_key_values(args.model_opt, "--model-opt"))
    return opts
