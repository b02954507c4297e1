"""Small figure helpers shared by commands: image grids."""
from __future__ import annotations

import math

import numpy as np
import torch


def to_display(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] (or [N, H, W] for C = 1) in [0, 1] for imshow."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = np.clip((x + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    return x[..., 0] if x.shape[-1] == 1 else x


def image_grid_figure(rows: list[torch.Tensor], row_titles: list[str] | None = None,
                      col_titles: list[str] | None = None, max_cols: int = 16, scale: float = 0.9):
    """A figure with one row of images per tensor in `rows` (each [N, C, H, W] in [-1, 1])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = min(max_cols, max(int(r.shape[0]) for r in rows))
    if len(rows) == 1 and rows[0].shape[0] > max_cols:   # one long row wraps into a square-ish grid
        n = int(rows[0].shape[0])
        n_cols = math.ceil(math.sqrt(n))
        rows = [rows[0][i:i + n_cols] for i in range(0, n, n_cols)]
        row_titles = None
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
    fig.subplots_adjust(wspace=0.05, hspace=0.1)
    return fig
