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


def mosaic_figure(arrays: dict[str, np.ndarray], max_samples: int = 8) -> Any:
    """Rows per sample: the sample, its source-image map (one colour per training image) and its
    source-location map (hue = source x, brightness = source y)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import hsv_to_rgb

    samples, src = arrays["samples"], arrays["source_image"]
    n = min(len(samples), max_samples)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    h, w = src.shape[1:]
    for i in range(n):
        img = samples[i].transpose(1, 2, 0)
        img = (img[..., 0] if img.shape[-1] == 1 else img).clip(-1, 1) * 0.5 + 0.5
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        ids = np.unique(src[i], return_inverse=True)[1].reshape(h, w)
        axes[i, 1].imshow(ids, cmap="tab20", interpolation="nearest")
        hsv = np.stack([arrays["source_x"][i] / max(w, 1), np.ones((h, w)),
                        0.35 + 0.65 * arrays["source_y"][i] / max(h - 1, 1)], -1).clip(0, 1)
        axes[i, 2].imshow(hsv_to_rgb(hsv), interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ("sample", "source image", "source location"), strict=True):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
