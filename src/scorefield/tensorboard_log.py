"""Scalars to TensorBoard event files in RUN/tb/, when the optional `tensorboard` package is installed.

One call per site: `log(run, step, loss=..., lr=...)` appends scalars (flushed at once, so a killed job keeps
them) and `log_summary(run, summary)` the numeric leaves of a summary dict at step 0. Without tensorboard both
are no-ops: nothing is written, nothing changes (set SCOREFIELD_TENSORBOARD=0 to turn it off with tensorboard
installed). View with `tensorboard --logdir RUN/tb` (or a parent folder).
"""
from __future__ import annotations

import atexit
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FOLDER = "tb"
_writers: dict[Path, Any] = {}
_available: bool | None = None


def available() -> bool:
    """Whether torch.utils.tensorboard imports (it needs the `tensorboard` package) and logging is not turned off
    by SCOREFIELD_TENSORBOARD=0."""
    global _available
    if os.environ.get("SCOREFIELD_TENSORBOARD", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _available is None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            _available = True
        except Exception:  # ImportError, or a protobuf / tensorboard version clash: logging is optional
            _available = False
    return _available


def _path(run: Any) -> Path:
    return Path(getattr(run, "path", run))


def writer(run: Any) -> Any | None:
    """The SummaryWriter of RUN/tb (one per run directory per process), or None without tensorboard."""
    if not available():
        return None
    folder = _path(run) / FOLDER
    if folder not in _writers:
        from torch.utils.tensorboard import SummaryWriter

        _writers[folder] = SummaryWriter(log_dir=str(folder))
    return _writers[folder]


def log(run: Any, step: int, prefix: str = "", **scalars: Any) -> None:
    """Write each finite number of `scalars` as `prefix`name at `step` (None and non-numbers are skipped)."""
    w = writer(run)
    if w is None:
        return
    for name, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            w.add_scalar(f"{prefix}{name}", float(value), int(step))
    w.flush()


def log_summary(run: Any, summary: Mapping[str, Any], step: int = 0) -> None:
    """The numeric leaves of a (nested) summary as scalars summary/<key>/<subkey>."""
    flat: dict[str, Any] = {}

    def walk(value: Any, name: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{name}/{k}" if name else str(k))
        else:
            flat[name] = value

    walk(summary, "")
    log(run, step, prefix="summary/", **flat)


def close(run: Any | None = None) -> None:
    """Close the writer of `run` (or every writer); the next `log` opens a new event file."""
    folders = [_path(run) / FOLDER] if run is not None else list(_writers)
    for folder in folders:
        w = _writers.pop(folder, None)
        if w is not None:
            w.close()


atexit.register(close)
