"""The one place that picks matplotlib's backend for the figures scorefield saves.

Run directories get PNG files, so outside a notebook the file backend (Agg) is selected: no window opens and no
display is needed. Inside a Jupyter kernel the backend is left as the notebook set it, so figures that scorefield
returns also show inline with `plt.show()` or `display(fig)`.
"""
from __future__ import annotations

import sys


def in_notebook() -> bool:
    """True inside a Jupyter/IPython kernel (which chose its own inline backend)."""
    return "ipykernel" in sys.modules


def select_backend() -> None:
    """Agg for saving figures, unless a notebook kernel owns the backend."""
    import matplotlib

    if not in_notebook():
        matplotlib.use("Agg")
