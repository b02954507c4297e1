"""The scale-out options shared by commands: `--shard bank|seeds`, and joining the torchrun process group.

Under `torchrun --nproc-per-node N scorefield COMMAND ...` every rank runs the same command line; `setup`
joins the process group and, on every rank but 0, silences standard output and progress bars (rank 0 writes
the run directory and reports). Without torchrun both are no-ops."""
from __future__ import annotations

import argparse
import os
import sys

SPLIT_COMMANDS = ("sample", "calibrate", "predict", "information", "criticality", "guidance-pulses",
                  "compare-processes")                                               # work dealt to the ranks


def add_shard_argument(p: argparse.ArgumentParser, bank: str | None = None) -> None:
    """`--shard`; bank: None where the bank split applies, else why it does not (then `--shard bank` is refused
    by `refuse_bank`, and the help says so)."""
    g = p.add_argument_group("scale-out (under torchrun)")
    if bank is not None:
        g.add_argument("--shard", default="seeds", choices=["seeds", "bank"],
                       help="what the torchrun ranks split: 'seeds' only (default; the units of work are dealt to "
                            f"the ranks, rank 0 writes one run directory); 'bank' is refused here ({bank}); no "
                            "effect without torchrun")
        return
    g.add_argument("--shard", default="seeds", choices=["seeds", "bank"],
                   help="what the torchrun ranks split: 'seeds' (default; each rank runs its share of the seeds, "
                        "rank 0 writes one run directory) or 'bank' (each rank holds a shard of the machines' "
                        "training images; the posteriors merge exactly); no effect without torchrun")


def refuse_bank(args: argparse.Namespace, why: str) -> None:
    """The one-line error for `--shard bank` in a command whose units are dealt whole to the ranks."""
    from .. import distributed

    if getattr(args, "shard", "seeds") == "bank":
        raise distributed.DistributedError(f"--shard bank does not apply to scorefield {args.command} ({why}); "
                                           "under torchrun its units are dealt to the ranks (--shard seeds, "
                                           "the default)")


def setup(args: argparse.Namespace) -> None:
    """Join the process group when launched by torchrun; quiet every rank but 0. A command that does not split
    its work is refused under more than one rank (each rank would write its own run directory)."""
    from .. import distributed

    if not distributed.init():
        return
    if args.command not in SPLIT_COMMANDS:
        raise distributed.DistributedError(
            f"scorefield {args.command} does not split its work over ranks (only {', '.join(SPLIT_COMMANDS)} "
            f"do); run it without torchrun or with --nproc-per-node 1")
    if not distributed.is_writer():
        from ..engine.progress import set_progress

        sys.stdout = open(os.devnull, "w")   # noqa: SIM115 - for the life of this rank
        set_progress(False)
        if hasattr(args, "no_progress"):
            args.no_progress = True


def writer() -> bool:
    """Whether this rank reports (rank 0, or the only process)."""
    from .. import distributed

    return distributed.is_writer()
