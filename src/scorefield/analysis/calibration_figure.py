"""The calibrated patch-size schedule P(t) as a figure (kamb-ganguli Fig. 4, middle)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .figures import _pyplot


def calibration_figure(cal: Any):
    """Chosen P per query time t (line) over the per-sample best sizes (dots, jittered), and the mean best
    cosine similarity of ε̂ per step (right panel)."""
    plt = _pyplot()
    t = np.asarray(cal.times)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    rng = np.random.default_rng(0)
    for i, ti in enumerate(t):
        b = cal.best[i][cal.best[i] > 0]
        ax.scatter(np.full(b.size, ti) + rng.uniform(-0.006, 0.006, b.size), b, s=6, alpha=0.3, color="tab:blue",
                   label="best P of one sample" if i == 0 else None)
    ax.plot(t, cal.chosen, "-o", color="tab:red", ms=3, drawstyle="steps-mid", label="calibrated P (median)")
    ax.set_xlabel("query time t (t = 1: pure noise)")
    ax.set_ylabel("patch size P (pixels)")
    ax.set_title(f"{cal.machine} patch size calibrated per step")
    ax.set_yticks(cal.candidate_sizes)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    ax2.plot(t, cal.cosine.max(1).mean(1), "-o", ms=3)
    ax2.set_xlabel("query time t")
    ax2.set_ylabel("cosine similarity of ε̂ (best P, mean over seeds)")
    ax2.set_title("how well the best size explains the network")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig
