"""Small figure helpers shared by commands: image grids (the tiling itself is `data.grid.image_grid`)."""
from __future__ import annotations

import numpy as np
import torch

from ..data.grid import image_grid


def to_display(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W] (C = 1) or [N, H, W, C] in [0, 1] for imshow."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def _pyplot():
    from ..plotting import select_backend

    select_backend()
    import matplotlib.pyplot as plt
    return plt


def grid_figure(images: torch.Tensor, columns: int | None = None, scale: float = 0.6, title: str | None = None):
    """A figure of images [N, C, H, W] in [-1, 1] tiled into a square-ish grid (row-major, sample 0 top left)."""
    plt = _pyplot()
    n = int(images.shape[0])
    columns = columns or max(1, int(np.ceil(np.sqrt(n))))
    picture = image_grid(images, columns)                      # [rows·H, columns·W, C] in [0, 1]
    rows = int(np.ceil(n / columns))
    fig, ax = plt.subplots(figsize=(scale * columns + 0.2, scale * rows + 0.2))
    ax.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    return fig


def image_grid_figure(rows: list[torch.Tensor], row_titles: list[str] | None = None,
                      col_titles: list[str] | None = None, scale: float = 0.9, title: str | None = None):
    """A figure with one row of images per tensor in `rows` (each [N, C, H, W] in [-1, 1]), titled."""
    plt = _pyplot()
    n_cols = max(int(r.shape[0]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(scale * n_cols, scale * len(rows)), squeeze=False)
    for r, imgs in enumerate(rows):
        disp = to_display(imgs)
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(disp):
                ax.imshow(disp[c], cmap="gray" if disp.ndim == 3 else None, vmin=0, vmax=1)
                if col_titles is not None and r == 0 and c < len(col_titles):
                    ax.set_title(col_titles[c], fontsize=6)
        if row_titles:
            axes[r][0].text(-0.1, 0.5, row_titles[r], transform=axes[r][0].transAxes, ha="right", va="center",
                            fontsize=7)
    height = scale * len(rows)
    head = (0.3 if col_titles is not None else 0.0) + (0.3 if title else 0.0)   # inches above the images
    fig.set_size_inches(scale * n_cols, height + head)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.05 / (height + head))
    fig.subplots_adjust(wspace=0.05, hspace=0.1, top=height / (height + head) if head else 0.95, bottom=0.02)
    return fig
