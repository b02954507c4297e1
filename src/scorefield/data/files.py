"""Readers for standard dataset files on disk: MNIST / FashionMNIST IDX files, CIFAR-10 python batches and
folders of images (CelebA style). Nothing is downloaded: point `root=` at a folder you already have.

A missing or malformed file raises DataError with one message naming the file and the expected format.
"""
from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .imageset import DataError, ImageSet
from .registry import register_dataset

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# ---------------------------------------------------------------- safe pickles

# The only globals a pickle of numpy arrays needs; anything else (code execution) is refused.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def restricted_pickle_load(fh: IO[bytes], encoding: str = "bytes") -> Any:
    """pickle.load that only builds plain containers and numpy arrays."""
    return _ArrayUnpickler(fh, encoding=encoding).load()


def _read_bytes(path: Path, expected: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {expected}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip ({exc}); expected {expected}") from exc
    return raw


# ---------------------------------------------------------------- IDX (MNIST, FashionMNIST)

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IDX_FORMAT = ("an IDX file: magic 0x0000 + dtype byte (0x08 = ubyte) + ndim byte, then ndim big-endian int32 "
              "sizes and exactly prod(sizes) values (plain or gzip)")


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file (plain or gzip) as a numpy array; checks the magic number, the rank and the size."""
    path = Path(path)
    data = _read_bytes(path, IDX_FORMAT)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: wrong magic number {data[:4].hex() or '(empty file)'}; expected {IDX_FORMAT}")
    dtype, rank = _IDX_DTYPES[data[2]], data[3]
    if ndim is not None and rank != ndim:
        raise DataError(f"{path}: holds a rank-{rank} array, expected rank {ndim}; expected {IDX_FORMAT}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes); expected {IDX_FORMAT}")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=rank, offset=4))
    expected_bytes = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_bytes:
        raise DataError(f"{path}: {len(data)} bytes but the header {shape} needs {expected_bytes} "
                        f"(truncated or wrong sizes); expected {IDX_FORMAT}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    """root/{prefix}-{kind}-idx?-ubyte[.gz], also in the torchvision layouts root/raw, root/<Set>/raw."""
    rank = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise DataError(f"{root / names[0]}[.gz]: file not found; expected MNIST-style IDX files "
                    f"({prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte, plain or .gz) in {root}")


def _check_root(root: str | Path | None, dataset: str) -> Path:
    if root is None:
        raise DataError(f"dataset '{dataset}' reads files from disk: pass root=<folder>")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: folder not found (root= for dataset '{dataset}')")
    return path


def load_idx_dataset(root: str | Path | None, split: str, name: str,
                     class_names: list[str] | None = None) -> ImageSet:
    """MNIST-layout IDX images and labels from `root`: split train → train-*, test → t10k-*."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DataError(f"unknown split '{split}' for {name}; choose from {sorted(prefixes)}")
    folder = _check_root(root, name)
    image_path = _find_idx(folder, prefixes[split], "images")
    label_path = _find_idx(folder, prefixes[split], "labels")
    images, labels = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
    if images.dtype != np.uint8:
        raise DataError(f"{image_path}: pixels of type {images.dtype}; expected unsigned bytes (0x08)")
    if len(labels) != len(images):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}")
    if len(images) == 0:
        raise DataError(f"{image_path}: holds 0 images; expected at least one")
    if class_names is not None and labels.max() >= len(class_names):
        bad = sorted({int(v) for v in labels[labels >= len(class_names)]})[:5]
        raise DataError(f"{label_path}: labels {bad} are outside the {len(class_names)} classes "
                        f"0…{len(class_names) - 1} of {name}")
    x = torch.from_numpy(images.astype(np.float32))[:, None] / 255.0 * 2 - 1  # [n, 1, H, W]
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), name=name,
                    class_names=class_names or [str(i) for i in range(int(labels.max(initial=0)) + 1)],
                    provenance={"source": str(image_path), "labels": str(label_path), "split": split})


@register_dataset("mnist-idx")
def load_mnist_idx(split: str = "train", root: str | Path | None = None) -> ImageSet:
    """MNIST from the original IDX files in `root` (train-images-idx3-ubyte, t10k-*, plain or .gz)."""
    return load_idx_dataset(root, split, "mnist-idx", [str(i) for i in range(10)])


@register_dataset("fashion-mnist")
def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageSet:
    """FashionMNIST from its IDX files in `root` (same names as MNIST), with its 10 class names."""
    return load_idx_dataset(root, split, "fashion-mnist", FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- CIFAR-10 python batches

CIFAR_FORMAT = ("a CIFAR-10 python batch: a pickled dict with b'data' (uint8 [n, 3072], RGB planes of 32×32) "
                "and b'labels' (n ints)")


def _load_pickle_file(path: Path, expected: str) -> Any:
    data = _read_bytes(path, expected)
    try:
        return restricted_pickle_load(io.BytesIO(data))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as exc:
        raise DataError(f"{path}: not a readable pickle ({exc}); expected {expected}") from exc


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (images uint8 [n, 3, 32, 32], labels int64 [n])."""
    path = Path(path)
    batch = _load_pickle_file(path, CIFAR_FORMAT)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: found {keys}; expected {CIFAR_FORMAT}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}; expected {CIFAR_FORMAT}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {labels.shape} labels for {len(data)} images; expected {CIFAR_FORMAT}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_folder(root: Path) -> Path:
    nested = root / "cifar-10-batches-py"
    return nested if nested.is_dir() else root


def _cifar_class_names(folder: Path) -> list[str]:
    meta_path = folder / "batches.meta"
    if not meta_path.is_file():
        return list(CIFAR10_CLASSES)
    meta = _load_pickle_file(meta_path, "batches.meta: a pickled dict with b'label_names'")
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise DataError(f"{meta_path}: no b'label_names' list; expected a pickled dict with b'label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


@register_dataset("cifar10")
def load_cifar10(split: str = "train", root: str | Path | None = None) -> ImageSet:
    """CIFAR-10 from its python batches in `root` (or root/cifar-10-batches-py).

    train = data_batch_1..5, test = test_batch; class names from batches.meta (the standard ten if it is
    absent)."""
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in files:
        raise DataError(f"unknown split '{split}' for cifar10; choose from {sorted(files)}")
    folder = _cifar_folder(_check_root(root, "cifar10"))
    batches = [read_cifar_batch(folder / name) for name in files[split]]
    images = np.concatenate([b[0] for b in batches])  # [n, 3, 32, 32] uint8
    labels = np.concatenate([b[1] for b in batches])
    class_names = _cifar_class_names(folder)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{folder}: labels outside 0..{len(class_names) - 1} (batches.meta has "
                        f"{len(class_names)} class names)")
    x = torch.from_numpy(images.astype(np.float32)) / 255.0 * 2 - 1
    return ImageSet(x, torch.from_numpy(labels), name="cifar10", class_names=class_names,
                    provenance={"source": str(folder), "files": files[split], "split": split})


# ---------------------------------------------------------------- image folder (CelebA style)


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file, centre-cropped to a square and resized to size × size: float [C, size, size] in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: could not be read as an image ({exc}); expected a JPEG or PNG file") from exc
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


@register_dataset("folder")
def load_folder(split: str = "train", root: str | Path | None = None, size: int = 64, channels: int = 3,
                max_images: int | None = None) -> ImageSet:
    """A folder of images (CelebA style), centre-cropped to squares and resized.

    Every .jpg/.jpeg/.png file directly in `root` (sorted by name; the first max_images if given),
    centre-cropped to a square, resized to size × size (bicubic), RGB (channels=3) or grey (channels=1).
    Unlabelled; the folder is one split, `train`."""
    from tqdm import tqdm

    if split != "train":
        raise DataError(f"an image folder has one split, 'train'; got '{split}'")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"size must be a positive integer, got {size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    folder = _check_root(root, "folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise DataError(f"max_images must be a positive integer, got {max_images!r}")
        paths = paths[:max_images]
    if not paths:
        raise DataError(f"{folder}: no image files; expected .jpg, .jpeg or .png files in this folder")
    arrays = [read_image(p, size, channels)
              for p in tqdm(paths, desc=f"reading {folder.name}", disable=len(paths) < 1000)]
    x = torch.from_numpy(np.stack(arrays)) * 2 - 1  # [n, C, size, size]
    return ImageSet(x, name="folder",
                    provenance={"source": str(folder), "files": len(paths), "size": size, "channels": channels,
                                "transform": "centre crop to square, bicubic resize", "split": split})
