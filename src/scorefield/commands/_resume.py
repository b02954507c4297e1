"""`scorefield CMD --resume RUN` for the analyses: the run directory records the command line that made it
(environment.json: "command", "cwd"), and a resume parses that command line again, so every option stands as it
was without being typed twice. Options typed with --resume must agree with the recorded ones, except the few
that are safe to change (output, progress, threads, and per command the analysis-only ones); a difference is
refused with the list. Relative paths of the recorded command are taken from the folder it ran in.

A run made from Python records no command line: its resume takes the options as given, and the experiment
checks them against its saved config.json itself.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runs import RunDir, RunError, read_json_file

# commands whose --resume replays the recorded command line (sample and train resume from their config.json)
REPLAYED = ("calibrate", "predict", "information", "criticality", "guidance-pulses", "compare-processes")
# options about where and how a run works, not what it computes (output folder, progress, CPU threads)
ALWAYS_FREE = {"resume", "no_progress", "out", "name", "threads", "func", "command", "command_parser"}
# options a command's experiment accepts to change on resume (it keeps the finished work that still applies)
SAFE_CHANGES = {"criticality": {"n", "smoothing", "tc_range"},
                "compare-processes": {"datasets", "processes", "seeds", "no_figures"}}
PATH_OPTIONS = ("run", "root", "schedule_from", "network_run", "classifier_run", "model_run", "out")


def recorded_command(run: RunDir) -> tuple[list[str], str] | None:
    """(the recorded argv, starting with the subcommand; the folder it ran in), or None for a run made from
    Python (or by an older version)."""
    env = read_json_file(run.file("environment.json")) if run.exists("environment.json") else {}
    command = env.get("command") if isinstance(env, dict) else None
    if not isinstance(command, list) or len(command) < 2 or not all(isinstance(a, str) for a in command):
        return None
    return command[1:], str(env.get("cwd") or ".")


def _given(parser: argparse.ArgumentParser, argv: Sequence[str], args: argparse.Namespace) -> set[str]:
    """The dests typed on the command line: a flag present in argv, or a value away from its default."""
    given = set()
    for action in parser._actions:            # argparse has no public accessor for a parser's actions
        if action.dest in (argparse.SUPPRESS, "help"):
            continue
        typed = any(a == opt or a.startswith(opt + "=") for opt in action.option_strings for a in argv)
        if typed or getattr(args, action.dest, None) != action.default:
            given.add(action.dest)
    return given


def _absolute(args: argparse.Namespace, cwd: str) -> argparse.Namespace:
    for dest in PATH_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not Path(value).is_absolute():
            setattr(args, dest, str(Path(cwd) / value))
    return args


def _show(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise RunError(f"no subcommand {command!r}")  # pragma: no cover - the CLI always has them


def resumed_arguments(args: argparse.Namespace, argv: Sequence[str],
                      parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments of `scorefield <args.command> --resume RUN <argv…>` (`parser`: the scorefield parser): the
    recorded command line of RUN with the safe options of `argv` applied. RunError if RUN was made by another
    command or `argv` changes an option that the run depends on (all such options listed, 'flag recorded →
    given'). Sets `runs.COMMAND_LINE` to the recorded one, so runs that the resume creates record it too."""
    from .. import runs

    parser = _subparser(parser, args.command)
    run = RunDir.open(args.resume)
    recorded = recorded_command(run)
    if recorded is None:
        return args
    saved_argv, cwd = recorded
    runs.COMMAND_LINE = ["scorefield", *saved_argv]
    if saved_argv[0] != args.command:
        raise RunError(f"{run.path} was made by `scorefield {saved_argv[0]}`; resume it with  scorefield "
                       f"{saved_argv[0]} --resume {run.path}")
    saved = _absolute(parser.parse_args(saved_argv[1:]), cwd)
    given = _given(parser, argv, args)
    now = _absolute(argparse.Namespace(**vars(args)), ".")
    free = ALWAYS_FREE | SAFE_CHANGES.get(args.command, set())
    flags = {a.dest: (a.option_strings[0] if a.option_strings else a.metavar or a.dest) for a in parser._actions}
    differ = [f"{flags[d]} {_show(getattr(saved, d, None))} → {_show(getattr(now, d))}" for d in sorted(given)
              if d not in free and getattr(saved, d, None) != getattr(now, d)]
    if differ:
        raise RunError(f"cannot resume {run.path} with different options: {'; '.join(differ)} (start a new run, "
                       "or resume without them)")
    for dest in given & free:
        setattr(saved, dest, getattr(args, dest))
    saved.resume, saved.command = args.resume, args.command
    saved.no_progress = args.no_progress
    return saved


def resume_target(runs: Sequence[Path]) -> Path | None:
    """The run directory an interrupted command resumes: the latest one held that is not inside another one
    held (a training run inside an experiment's folder resumes with the experiment)."""
    resolved = [Path(p).resolve() for p in runs]
    for path, full in zip(reversed(runs), reversed(resolved), strict=True):
        if not any(full != other and other in full.parents for other in resolved):
            return Path(path)
    return None
