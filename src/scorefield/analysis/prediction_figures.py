"""Figures of a prediction run: theory r² against the IS baseline (kamb-ganguli Fig. 10) and image grids
network / theories with each sample's r² (Fig. 1)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .figures import _pyplot, to_display


def scatter_vs_baseline(scores: Mapping[str, Mapping[str, torch.Tensor]], baseline: str = "is"):
    """One dot per sample: r² of each theory (y) against r² of the baseline (x), with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    base = scores[baseline]["r2"].numpy()
    lo = min(float(np.nanmin(s["r2"].numpy())) for s in scores.values())
    lo = min(lo, 0.0)
    for name, s in scores.items():
        if name != baseline:
            ax.scatter(base, s["r2"].numpy(), s=10, alpha=0.7, label=name)
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="equal r²")
    ax.set_xlabel(f"r² of {baseline} vs network (per sample)")
    ax.set_ylabel("r² of theory vs network (per sample)")
    ax.set_title("which theory predicts each network sample")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def comparison_grid(samples: Mapping[str, torch.Tensor], scores: Mapping[str, Mapping[str, torch.Tensor]],
                    names: Sequence[str], start: int, count: int):
    """Rows: the network, then each theory; columns: samples start…start+count−1; r² under each theory image."""
    plt = _pyplot()
    rows = ["network", *names]
    n = min(count, samples["network"].shape[0] - start)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.85 * n + 0.6, 1.0 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        disp = to_display(samples[name][start:start + n])
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(disp[c], cmap="gray" if disp.ndim == 3 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if name != "network":
                ax.set_xlabel(f"{float(scores[name]['r2'][start + c]):.2f}", fontsize=6, labelpad=1)
            else:
                ax.set_title(f"#{start + c}", fontsize=6, pad=2)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle("network samples and each theory's prediction from the same seed (r² below)", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.35)
    return fig
