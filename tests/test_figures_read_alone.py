"""Figures that read alone: every sample a figure claims to show is drawn, and the figure says what it shows."""
from __future__ import annotations

import numpy as np
import torch

from scorefield.analysis.figures import grid_figure, image_grid_figure
from scorefield.analysis.mosaic import mosaic_figure


def _mosaic_arrays(n: int, h: int = 6, w: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"samples": rng.uniform(-1, 1, (n, 1, h, w)).astype(np.float32),
            "source_image": rng.integers(0, 50, (n, h, w)), "source_y": rng.integers(0, h, (n, h, w)),
            "source_x": rng.integers(0, w, (n, h, w)), "alpha_bar": np.float64(0.999)}


def _drawn(fig) -> int:
    return sum(1 for ax in fig.axes if ax.images)


def test_mosaic_draws_every_sample_with_a_location_key():
    for n in (3, 16, 20):
        fig = mosaic_figure(_mosaic_arrays(n))
        assert _drawn(fig) == 3 * n + 1                       # sample, source image, source location + key
        assert f"all {n} samples" in fig._suptitle.get_text() and "ᾱ = 0.999" in fig._suptitle.get_text()


def test_mosaic_says_when_it_shows_fewer():
    fig = mosaic_figure(_mosaic_arrays(10), max_samples=4)
    assert _drawn(fig) == 3 * 4 + 1 and "first 4 of 10" in fig._suptitle.get_text()


def test_mosaic_counts_the_source_images_under_each_sample():
    arrays = _mosaic_arrays(2)
    arrays["source_image"][0] = 7                             # one source image for the whole first sample
    fig = mosaic_figure(arrays)
    labels = [ax.get_xlabel() for ax in fig.axes if " image" in ax.get_xlabel()]
    assert labels[0] == "1 image" and labels[1].endswith(" images")


def test_grids_carry_their_titles():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    fig = image_grid_figure([x, x], row_titles=["a", "b"], col_titles=[f"#{i}" for i in range(5)], title="T")
    assert fig._suptitle.get_text() == "T" and _drawn(fig) == 10
    assert grid_figure(x, title="5 samples").axes[0].get_title() == "5 samples"
