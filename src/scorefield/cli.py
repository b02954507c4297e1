"""The `scorefield` command: thin. Each subcommand lives in `scorefield.commands.<name>` and exposes
`register(subparsers)` (modules named _* are shared helpers); this module only discovers them, parses, and calls."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from typing import NoReturn

from . import commands
from .cli_messages import in_cli_terms
from .options import closest

# commands whose run directories resume with --resume RUN
RESUMABLE = ("sample", "train", "calibrate", "predict", "information", "criticality", "guidance-pulses",
             "compare-processes", "paper-run")


class Parser(argparse.ArgumentParser):
    """argparse with the closest valid name added to 'invalid choice' errors (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            message += closest(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="scorefield",
        description="The physics of convolutional diffusion models: analytic local score machines, "
                    "trained CNN denoisers, samplers and analyses. Every command writes a run directory.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # private helpers shared by subcommands
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if getattr(args, "no_progress", False):
        from .engine.progress import set_progress

        set_progress(False)
    from . import runs
    from .commands._resume import REPLAYED, resume_target, resumed_arguments

    try:
        # a run records the command line that made it; an analysis resumes by parsing it again
        runs.COMMAND_LINE = None if getattr(args, "resume", None) else ["scorefield", *argv]
        if args.command in REPLAYED and getattr(args, "resume", None):
            args = resumed_arguments(args, argv, parser)
        from .commands._distributed import setup as join_ranks

        join_ranks(args)                   # under torchrun: the process group; only rank 0 reports
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        target = resume_target(runs.ACTIVE_RUNS)
        hint = (f"; finished work is saved: resume with  scorefield {args.command} --resume {target}"
                if target is not None and args.command in RESUMABLE else "")
        print(f"scorefield {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError) as exc:
        # library errors carry a message meant for the user; show it without a traceback
        message = in_cli_terms(str(exc), getattr(args, "command_parser", None))
        print(f"scorefield {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        runs.COMMAND_LINE = None


if __name__ == "__main__":
    sys.exit(main())
