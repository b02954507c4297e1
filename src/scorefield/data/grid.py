"""A grid picture of the first images of an ImageSet, saved with the pixel values behind it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .imageset import DataError, ImageSet


def image_grid(images: torch.Tensor, columns: int = 8, gap: int = 1) -> np.ndarray:
    """Tile images [N, C, H, W] in [-1, 1] into one picture [rows·(H+gap)−gap, columns·(W+gap)−gap, C] in
    [0, 1], row by row, with white gaps."""
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    canvas = np.ones((rows * (h + gap) - gap, columns * (w + gap) - gap, c), dtype=np.float32)
    pixels = ((images.detach().cpu().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = pixels[i]
    return canvas


def save_image_grid(data: ImageSet, path: str | Path, count: int = 64, columns: int = 8) -> tuple[Path, Path]:
    """Save the first `count` images as a PNG grid and their values as `<path stem>.npz` (images, labels).
    Refuses to overwrite either file. Returns (png path, npz path)."""
    import matplotlib.image

    png = Path(path)
    if png.suffix.lower() != ".png":
        raise DataError(f"{png}: the grid is written as PNG; give a path ending in .png")
    npz = png.with_suffix(".npz")
    for target in (png, npz):
        if target.exists():
            raise DataError(f"{target}: already exists; results are never overwritten, choose another path")
    if len(data) == 0:
        raise DataError(f"dataset '{data.name}' is empty: nothing to draw")
    shown = data.images[:count]  # [n, C, H, W]
    picture = image_grid(shown, columns)
    png.parent.mkdir(parents=True, exist_ok=True)
    if picture.shape[2] == 1:
        matplotlib.image.imsave(png, picture[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        matplotlib.image.imsave(png, picture)
    labels = data.labels[:count].numpy() if data.labels is not None else np.zeros(0, dtype=np.int64)
    np.savez_compressed(npz, images=shown.numpy(), labels=labels)
    return png, npz
