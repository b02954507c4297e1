"""A minimal PNG encoder for small image arrays (no figure library): the report embeds every sample as a
lossless PNG data URI, so a page of a few hundred 28×28 samples stays small and renders pixel for pixel."""
from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(image: np.ndarray) -> bytes:
    """image: [H, W] (grey) or [H, W, 3] (RGB), floats in [0, 1] or uint8 -> PNG bytes (8 bits per channel)."""
    a = np.asarray(image)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or 0 in a.shape:
        raise ValueError(f"encode_png takes [H, W] or [H, W, 3] arrays, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.round(np.nan_to_num(a.astype(np.float64), nan=0.0).clip(0.0, 1.0) * 255).astype(np.uint8)
    height, width = a.shape[:2]
    colour_type = 0 if a.ndim == 2 else 2
    rows = a.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))   # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Samples [N, C, H, W] in [−1, 1] -> [N, H, W] (C = 1) or [N, H, W, 3] in [0, 1]; other channel counts
    show their first channel."""
    x = (np.asarray(images, dtype=np.float64).clip(-1.0, 1.0) + 1.0) / 2.0
    if x.ndim != 4:
        raise ValueError(f"samples must be [N, C, H, W], got shape {x.shape}")
    return x[:, 0] if x.shape[1] != 3 else x.transpose(0, 2, 3, 1)
