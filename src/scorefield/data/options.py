"""Options every loader shares (subset, class filter, ...), applied after loading."""
from __future__ import annotations

import torch

from .imageset import DataError, ImageSet


def apply_options(data: ImageSet, subset: int | None = None, seed: int = 0) -> ImageSet:
    """Apply the shared loader options to a freshly loaded ImageSet."""
    if subset is not None:
        if subset <= 0:
            raise DataError(f"subset must be a positive number of images, got {subset}")
        if subset < len(data):
            g = torch.Generator().manual_seed(seed)
            index = torch.randperm(len(data), generator=g)[:subset].sort().values
            data = data.select(index, note=f"subset {subset} (seed {seed})")
    return data
