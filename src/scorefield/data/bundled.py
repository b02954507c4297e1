"""Datasets that ship inside installed packages (no download ever)."""
from __future__ import annotations

import torch

from .imageset import ImageSet
from .registry import register_dataset


@register_dataset("digits")
def load_digits(split: str = "train") -> ImageSet:
    """scikit-learn's 8×8 handwritten digits (1,797 images, 17 grey levels), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return ImageSet(images, torch.as_tensor(bunch.target), name="digits",
                    class_names=[str(i) for i in range(10)],
                    provenance={"source": "sklearn.datasets.load_digits", "split": split})
