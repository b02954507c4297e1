"""scorefield: the physics of convolutional diffusion models, runnable, fast and testable."""
from __future__ import annotations

import importlib
from typing import Any

from . import convert, data, engine, models, sampling, schedules
from ._version import __version__

_LAZY = ("training", "runs", "analysis", "experiments", "checkpoints", "forward", "distributed", "report")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scorefield' has no attribute '{name}'")


__all__ = ["__version__", "convert", "data", "engine", "models", "sampling", "schedules", *_LAZY]
