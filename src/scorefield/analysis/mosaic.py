"""Patch mosaics: which training patch each pixel of a sample came from (kamb-ganguli Sec. 4, Fig. 3–4).

At a low noise level the posterior of every pixel of a patch machine is concentrated on one bank patch; its
source (training image, location) per pixel is the sample's provenance map. Samples are locally consistent
patch mosaics, so neighbouring pixels with the same source show which training patches were stitched together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor
MOSAIC_ALPHA_BAR = 0.999


def patch_mosaic(run_dir_or_samples: str | Path | Tensor, model: torch.nn.Module | None = None,
                 labels: Tensor | None = None, alpha_bar: float = MOSAIC_ALPHA_BAR,
                 save: bool = True) -> dict[str, np.ndarray]:
    """Provenance of every pixel of samples [N, C, H, W] (or of the samples of a sampling run directory) under a
    patch machine, recomputed at ᾱ = `alpha_bar`. Returns arrays: samples, source_image [N, H, W] (dataset
    index), source_y / source_x [N, H, W] (centre of the arg-max patch in that image), nearest [N, C, H, W] (the
    posterior mean). For a run directory, `model` defaults to the run's own model, and the figure
    (mosaic.png) and the arrays (mosaic.npz) are saved into it."""
    run = None
    if isinstance(run_dir_or_samples, Tensor):
        samples = run_dir_or_samples
    else:
        from ..runs import RunDir
        run = RunDir.open(run_dir_or_samples)
        samples, run_labels, run_model = load_sampling_run(run)
        model = model if model is not None else run_model
        labels = labels if labels is not None else run_labels
    if model is None or not hasattr(model, "denoise_with_provenance"):
        raise ValueError("patch_mosaic needs a patch machine (is, es, ls, els, bbels) with provenance")
    samples = samples.to(torch.float32)
    ab = torch.full((samples.shape[0],), float(alpha_bar))
    nearest, prov = model.denoise_with_provenance(samples, ab, labels)
    if prov.ndim == 2:                                     # IS / ES: one source (and shift) per sample
        prov = prov[:, None, None, :].expand(-1, *samples.shape[2:], 3)
    arrays = {"samples": samples.numpy(), "nearest": nearest.numpy(), "alpha_bar": np.float64(alpha_bar),
              "source_image": prov[..., 0].numpy(), "source_y": prov[..., 1].numpy(),
              "source_x": prov[..., 2].numpy()}
    if run is not None and save:
        run.save_arrays("mosaic.npz", **arrays)
        run.save_figure("mosaic.png", mosaic_figure(arrays))
    return arrays


def load_sampling_run(run: Any) -> tuple[Tensor, Tensor | None, torch.nn.Module]:
    """(samples [N, C, H, W], labels [N] or None, the run's model rebuilt from config.json)."""
    from .. import data as sf_data
    from .. import models

    if not run.exists("samples.npz"):
        raise FileNotFoundError(f"{run.path} holds no samples.npz (run `scorefield sample` first)")
    arrays = run.load_arrays("samples.npz")
    if "samples" not in arrays:
        raise ValueError(f"{run.path / 'samples.npz'} has no array 'samples'")
    samples = torch.as_tensor(arrays["samples"], dtype=torch.float32)
    labels = torch.as_tensor(arrays["labels"]) if "labels" in arrays else None
    name, model_options = _named(run.config, "model")
    data_name, data_options = _named(run.config, "data")
    data = sf_data.load(data_name, **data_options)
    return samples, labels, models.make(name, data, **model_options)


def _named(config: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    """Read `key` from a run config as {"name": ..., options...}, or as a name plus `key`_options."""
    entry = config.get(key)
    if isinstance(entry, dict) and "name" in entry:
        options = {k: v for k, v in entry.items() if k != "name"}
        options.update(entry.get("options", {}) if isinstance(entry.get("options"), dict) else {})
        options.pop("options", None)
        return str(entry["name"]), options
    if isinstance(entry, str):
        return entry, dict(config.get(f"{key}_options", {}))
    raise ValueError(f"run config has no '{key}' entry naming the {key} (found keys: {sorted(config)})")


MOSAIC_COLUMNS = 16        # samples per row block of the figure


def _location_colours(source_y: np.ndarray, source_x: np.ndarray, h: int, w: int) -> np.ndarray:
    """RGB [..., 3] of a source position: hue = source column x, brightness = source row y."""
    from matplotlib.colors import hsv_to_rgb

    hsv = np.stack([source_x / max(w, 1), np.ones_like(source_x, dtype=float),
                    0.35 + 0.65 * source_y / max(h - 1, 1)], -1).clip(0, 1)
    return hsv_to_rgb(hsv)


def mosaic_figure(arrays: dict[str, np.ndarray], max_samples: int | None = None) -> Any:
    """Every sample (or the first `max_samples`, said in the title) in columns, three rows each: the sample, its
    source-image map (one colour per training image; the count of distinct images under it) and its
    source-location map (hue = source x, brightness = source y; the key is the last panel)."""
    import matplotlib.pyplot as plt

    samples, src = arrays["samples"], arrays["source_image"]
    total = len(samples)
    n = total if max_samples is None else min(total, max_samples)
    h, w = src.shape[1:]
    cols = min(n, MOSAIC_COLUMNS)
    blocks = -(-n // cols)
    fig, axes = plt.subplots(3 * blocks, cols + 1, figsize=(1.1 * (cols + 1) + 0.6, 3.6 * blocks + 0.8),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(n):
        row, col = 3 * (i // cols), i % cols
        img = samples[i].transpose(1, 2, 0)
        img = (img[..., 0] if img.shape[-1] == 1 else img).clip(-1, 1) * 0.5 + 0.5
        axes[row, col].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[row, col].set_title(f"#{i}", fontsize=7)
        ids = np.unique(src[i], return_inverse=True)[1].reshape(h, w)
        axes[row + 1, col].imshow(ids, cmap="tab20", interpolation="nearest")
        count = int(ids.max()) + 1
        axes[row + 1, col].set_xlabel(f"{count} image{'s' if count != 1 else ''}", fontsize=7)
        axes[row + 2, col].imshow(_location_colours(arrays["source_y"][i], arrays["source_x"][i], h, w),
                                  interpolation="nearest")
    for block in range(blocks):
        for offset, label in enumerate(("sample", "source image", "source location")):
            axes[3 * block + offset, 0].set_ylabel(label, fontsize=8)
    yy, xx = np.mgrid[0:h, 0:w]
    key = axes[2, cols]
    key.imshow(_location_colours(yy, xx, h, w), interpolation="nearest")
    key.set_title("location key", fontsize=7)
    key.set_xlabel("source x →", fontsize=7)
    key.set_ylabel("source y →", fontsize=7)
    shown = f"all {total} samples" if n == total else f"the first {n} of {total} samples"
    ab = float(arrays["alpha_bar"]) if "alpha_bar" in arrays else MOSAIC_ALPHA_BAR
    fig.suptitle(f"Patch mosaic ({shown}): the training patch that dominates each pixel's posterior at "
                 f"ᾱ = {ab:g}\nmiddle: one colour per source training image (colours repeat after 20); "
                 "bottom: where in that image the patch centre lies", fontsize=9)
    fig.tight_layout()
    return fig
