"""Options every loader shares, applied after loading, in this order:
classes → subset (+ seed) → channels → binarize → pad_to. Each operation is recorded in
`provenance["operations"]`.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .imageset import DataError, ImageSet

Classes = int | Sequence[int]


def apply_options(data: ImageSet, subset: int | None = None, seed: int = 0, classes: Classes | None = None,
                  channels: int | None = None, binarize: float | bool | None = None,
                  pad_to: int | None = None) -> ImageSet:
    """Apply the shared loader options to a freshly loaded ImageSet.

    classes:  a label or a list of labels to keep (labels keep their original values).
    subset:   keep this many images, drawn without replacement with `seed` (after the class filter).
    channels: 1 → grey (mean over channels); 3 → grey repeated three times (a no-op when already matching).
    binarize: threshold t in [-1, 1]: pixels > t become +1, the rest −1 (True means t = 0).
    pad_to:   pad every image to pad_to × pad_to with background −1, centred (extra row/column at the end).
    """
    _check_int("seed", seed, minimum=None)
    if classes is not None:
        data = select_classes(data, classes)
    if subset is not None:
        data = take_subset(data, subset, seed)
    if channels is not None:
        data = convert_channels(data, channels)
    if binarize is not None and binarize is not False:
        data = binarize_images(data, 0.0 if binarize is True else binarize)
    if pad_to is not None:
        data = pad_images(data, pad_to)
    return data


def _check_int(name: str, value: object, minimum: int | None = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise DataError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _with_images(data: ImageSet, images: torch.Tensor, note: str, labels: torch.Tensor | None = None,
                 keep_labels: bool = True) -> ImageSet:
    """A copy of `data` with new images (and the operation appended to provenance)."""
    provenance = dict(data.provenance)
    provenance["operations"] = [*provenance.get("operations", []), note]
    new_labels = labels if labels is not None else (data.labels if keep_labels else None)
    return ImageSet(images, new_labels, name=data.name, class_names=data.class_names, provenance=provenance)


def take_subset(data: ImageSet, subset: int, seed: int = 0) -> ImageSet:
    """`subset` images drawn without replacement (a fixed permutation for a given seed), kept in order."""
    subset = _check_int("subset", subset)
    if subset >= len(data):
        return _with_images(data, data.images, f"subset {subset} ≥ {len(data)} images: all kept")
    g = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(len(data), generator=g)[:subset].sort().values
    return data.select(index, note=f"subset {subset} (seed {seed})")


def select_classes(data: ImageSet, classes: Classes) -> ImageSet:
    """The images whose label is in `classes` (an int or a list of ints)."""
    if data.labels is None:
        raise DataError(f"classes={classes!r}: dataset '{data.name}' has no labels")
    wanted = [classes] if isinstance(classes, numbers.Integral) else classes
    if isinstance(wanted, (str, bytes)) or not isinstance(wanted, Sequence) or len(wanted) == 0:
        raise DataError(f"classes must be a label or a non-empty list of labels, got {classes!r}")
    labels = [_check_int("each entry of classes", c, minimum=0) for c in wanted]
    n_classes = data.num_classes
    unknown = [c for c in labels if c >= n_classes]
    if unknown:
        raise DataError(f"classes {unknown} do not exist in '{data.name}' (labels 0..{n_classes - 1})")
    keep = torch.isin(data.labels, torch.tensor(labels, dtype=torch.int64))
    index = torch.nonzero(keep).reshape(-1)
    if len(index) == 0:
        raise DataError(f"classes={labels}: no images of these classes in '{data.name}'")
    return data.select(index, note=f"classes {labels}")


def convert_channels(data: ImageSet, channels: int) -> ImageSet:
    """1 → grey by the mean over channels; 3 → grey repeated (only from one channel)."""
    channels = _check_int("channels", channels)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if data.channels == channels:
        return data
    if channels == 1:
        # images: [N, C, H, W] -> [N, 1, H, W]
        return _with_images(data, data.images.mean(dim=1, keepdim=True), f"channels {data.channels}→1 (mean)")
    if data.channels != 1:
        raise DataError(f"channels=3 needs grey images, but '{data.name}' has {data.channels} channels")
    return _with_images(data, data.images.expand(-1, 3, -1, -1).clone(), "channels 1→3 (grey repeated)")


def binarize_images(data: ImageSet, threshold: float) -> ImageSet:
    """Pixels above `threshold` → +1, the others → −1 (the ±1 fields of the criticality paper)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise DataError(f"binarize must be a threshold in [-1, 1] (or True for 0), got {threshold!r}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise DataError(f"binarize threshold must lie in [-1, 1], got {threshold}")
    images = torch.where(data.images > float(threshold), 1.0, -1.0)
    return _with_images(data, images, f"binarize at {float(threshold):g} → ±1")


def pad_images(data: ImageSet, pad_to: int) -> ImageSet:
    """Pad to pad_to × pad_to with background −1, centred; an odd excess goes to the bottom/right."""
    pad_to = _check_int("pad_to", pad_to)
    if pad_to < data.height or pad_to < data.width:
        raise DataError(f"pad_to={pad_to} is smaller than the images ({data.height}×{data.width})")
    if pad_to == data.height == data.width:
        return data
    top, left = (pad_to - data.height) // 2, (pad_to - data.width) // 2
    bottom, right = pad_to - data.height - top, pad_to - data.width - left
    images = F.pad(data.images, (left, right, top, bottom), value=-1.0)  # [N, C, pad_to, pad_to]
    return _with_images(data, images, f"pad {data.height}×{data.width} → {pad_to}×{pad_to} with −1")
