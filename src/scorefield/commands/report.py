"""`scorefield report RUN`: a static, self-contained report.html of any run directory."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write RUN/report.html: config, summary, tables, figures (and per-kind sections)",
        description="Render a run directory as one self-contained HTML page (figures embedded, no network "
                    "needed): kind, config, summary, every table and figure, the engine log and metrics; "
                    "prediction runs add the network / theory / IS grids with each sample's r² and Pearson r, "
                    "sampling runs with a mosaic (scorefield mosaic) the patch provenance on hover.")
    parser.add_argument("run", metavar="RUN", help="a run directory (holding config.json)")
    parser.add_argument("--max-samples", type=int, default=64,
                        help="samples shown in the prediction grids and mosaics (default 64)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report

    path = write_report(args.run, max_samples=args.max_samples)
    print(f"report: {path}")
    return 0
