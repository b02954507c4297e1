"""Nearest training image of each sample: the memorization check."""
from __future__ import annotations

import torch

from ..data import ImageSet

Tensor = torch.Tensor


def nearest_training_images(samples: Tensor, data: ImageSet, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """For samples [B, C, H, W]: (index [B] of the nearest training image in L2, RMS-per-pixel distance [B]).

    Streams over the training set in chunks, so memory stays bounded for any dataset size.
    """
    if tuple(samples.shape[1:]) != tuple(data.images.shape[1:]):
        raise ValueError(f"samples have image shape {tuple(samples.shape[1:])}, "
                         f"the training set {tuple(data.images.shape[1:])}")
    q = samples.reshape(samples.shape[0], -1).to(torch.float64)             # [B, D]
    best = torch.full((q.shape[0],), torch.inf, dtype=torch.float64)
    index = torch.zeros(q.shape[0], dtype=torch.int64)
    for start in range(0, len(data), chunk):
        k = data.images[start:start + chunk].reshape(-1, q.shape[1]).to(torch.float64)  # [N, D]
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ k.T + (k * k).sum(1)    # [B, N]
        d2_min, arg = d2.min(dim=1)
        better = d2_min < best
        best = torch.where(better, d2_min, best)
        index = torch.where(better, arg + start, index)
    # recompute the winners exactly (the expansion above can lose digits when a sample is a training image)
    exact = (q - data.images[index].reshape(q.shape[0], -1).to(torch.float64)).pow(2).mean(1).sqrt()
    return index, exact
