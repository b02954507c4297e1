"""Data: the ImageSet container and loaders (synthetic, bundled in packages, standard files on disk).

    data = sf.data.load("mnist", split="train", subset=1000, seed=0)
    data = sf.data.load("grf", n=500, size=32, exponent=2.0)
    data = sf.data.load("fashion-mnist", root="~/data/fashion", binarize=0.0, pad_to=32)
"""
from __future__ import annotations

import inspect
from typing import Any

from . import bundled, files, phi4, synthetic  # noqa: F401  (registers loaders; phi4 also holds the φ⁴ observables)
from .imageset import DataError, ImageSet
from .options import apply_options
from .registry import DATASETS, available_datasets, get_loader, register_dataset
from .synthetic import PatchDictionary, gaussian_random_field, make_patch_dictionary, power_law_spectrum

# Options that `apply_options` understands for every dataset (besides subset and seed).
_SHARED_OPTIONS: set[str] = {"classes", "channels", "binarize", "pad_to"}


def loader_options(name: str) -> list[str]:
    """The options a dataset's own loader accepts (besides split)."""
    parameters = inspect.signature(get_loader(name)).parameters
    return [p for p in parameters if p != "split"]


def load(name: str, split: str = "train", subset: int | None = None, seed: int = 0,
         **options: Any) -> ImageSet:
    """Load a registered dataset by name and apply the shared options (see `apply_options`).

    An option the loader names goes to the loader only (so `channels=3` makes independent RGB fields for
    `grf`, and `seed` also seeds generated data); the other shared options are applied to the result.
    Anything else is an error naming the accepted options."""
    own = loader_options(name)
    unknown = sorted(k for k in options if k not in own and k not in _SHARED_OPTIONS)
    if unknown:
        accepted = ", ".join(sorted({*own, *_SHARED_OPTIONS, "subset", "seed", "split"}))
        raise DataError(f"unknown option(s) {', '.join(unknown)} for dataset '{name}'; accepted: {accepted}")
    loader_kwargs = {k: v for k, v in options.items() if k in own}
    if "seed" in own:
        loader_kwargs["seed"] = seed
    shared = {k: v for k, v in options.items() if k in _SHARED_OPTIONS and k not in own}
    data = get_loader(name)(split=split, **loader_kwargs)
    return apply_options(data, subset=subset, seed=seed, **shared)


__all__ = ["DATASETS", "DataError", "ImageSet", "PatchDictionary", "apply_options", "available_datasets",
           "gaussian_random_field", "get_loader", "load", "loader_options", "make_patch_dictionary",
           "power_law_spectrum", "register_dataset"]
