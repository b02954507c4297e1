"""Data: the ImageSet container and loaders (synthetic, bundled in packages, standard files on disk).

    data = sf.data.load("mnist", split="train", subset=1000, seed=0)
"""
from __future__ import annotations

from typing import Any

from . import bundled  # noqa: F401  (registers loaders)
from .imageset import DataError, ImageSet
from .options import apply_options
from .registry import DATASETS, available_datasets, get_loader, register_dataset


def load(name: str, split: str = "train", subset: int | None = None, seed: int = 0,
         **options: Any) -> ImageSet:
    """Load a registered dataset by name and apply the shared options (see `apply_options`)."""
    loader = get_loader(name)
    shared = {k: options.pop(k) for k in list(options) if k in _SHARED_OPTIONS}
    data = loader(split=split, **options)
    return apply_options(data, subset=subset, seed=seed, **shared)


_SHARED_OPTIONS: set[str] = set()

__all__ = ["DATASETS", "DataError", "ImageSet", "apply_options", "available_datasets", "get_loader", "load",
           "register_dataset"]
