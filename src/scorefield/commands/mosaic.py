"""`scorefield mosaic RUN`: the patch-provenance mosaic of a sampling run's samples."""
from __future__ import annotations

import argparse

from ..analysis.mosaic import MOSAIC_ALPHA_BAR, patch_mosaic


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mosaic", help="which training patch each sample pixel came from (saves mosaic.png, mosaic.npz)",
        description="Recompute, at a low noise level, the arg-max bank patch (training image, location) of "
                    "every pixel of the samples in a sampling run directory, under the run's own patch "
                    "machine, and save the provenance figure and arrays into that directory.")
    parser.add_argument("run", help="a sampling run directory (holding samples.npz and config.json)")
    parser.add_argument("--alpha-bar", type=float, default=MOSAIC_ALPHA_BAR,
                        help=f"noise level at which provenance is read (default {MOSAIC_ALPHA_BAR})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.alpha_bar <= 1.0:
        raise ValueError(f"--alpha-bar must lie in (0, 1], got {args.alpha_bar}")
    arrays = patch_mosaic(args.run, alpha_bar=args.alpha_bar)
    print(f"mosaic of {len(arrays['samples'])} samples: {args.run}/mosaic.png, {args.run}/mosaic.npz")
    return 0
