"""Trained networks that ship with the package, each trained by a documented scorefield command.

Each folder is a trimmed training run directory: model.safetensors + model.json (the weights and the net's
config), config.json (the training options and the data it was trained on, which is also the bank the
analytic machines use when they explain it), loss.png / loss.npz and TRAINED_BY (the exact command).
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT = "mnist-resnet-small"


def available() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "model.safetensors").is_file())


def path(name: str = DEFAULT) -> Path:
    """The run directory of a bundled network."""
    folder = ROOT / name
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no bundled network '{name}'; available: {', '.join(available()) or 'none'}")
    return folder


def load(name: str = DEFAULT):
    """The bundled trained denoiser `name` (on the CPU, eval mode)."""
    from ..models import load as load_run

    return load_run(path(name))
