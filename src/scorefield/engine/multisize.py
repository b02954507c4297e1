"""The ELS posterior (circular padding, one shared bank) and the bbELS posterior (zero padding, the bank of each
query pixel's border class) at many patch sizes from one pass over the bank (calibration, kamb-ganguli App. C.2;
source: `engine/csrc/multisize_box.cpp`).

For a noisy sample x (a = √ᾱ, s² = 1−ᾱ) and a training image K, the squared distance between the query patch
at pixel u and the scaled key patch at v = u − δ is, at every patch size P, the P×P circular box sum at u of the
same image p_δ = Σ_c (x_c − a·K_c(· − δ))² (kamb-ganguli eq. 9–10, circular; see `box`). With zero padding and
v in u's border class (eq. 41: the same distances to the four borders, capped at (P−1)/2) the parts of both
patches outside the image coincide, so the distance is the box sum over the part of the window inside the
image; the class is a per-size mask on the displacements, finer as P grows. The kernel forms p_δ once per
(sample, training image, δ) as exact fixed-point integers, builds one integral image of it (extended circularly
or with zeros), and reads every size's window sum from that table (four reads); each size keeps its own
streaming log-sum-exp state per query pixel and its own skip floor. The product image, the table and the keys'
centre values are shared by all sizes; what stays per size is the window sum, the logit and, for the key groups
that lie within `threshold_for(N·H·W, tolerance)` of the size's running max, the exp and the fold. A window sum
only grows with P, so a group's largest logit at one size bounds it at every larger size, and groups below a
larger size's floor skip even their window sums there.

The fixed-point scale of a sample is set by the largest size (`fixed_scales`), so the logit error of
the grid is at most P²/(2·scale)/(2s²) at size P (`MultiSizeResult.logit_error_bound`, per size); the skipped
mass fraction at most (keys per query)·e^−threshold, as in `box`.

`multisize_posterior` is the entry point; `multisize_reference` the float64 brute force of the tests and of the
self-check run once after the library loads. `SCOREFIELD_KERNEL=reference` disables the library.
"""
from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import box
from . import progress as engine_progress
from .build import CSRC, CompiledKernel
from .geometry import border_classes, extract_patches

Tensor = torch.Tensor

SOURCE = CSRC / "multisize_box.cpp"
MAX_SIZES = 64                  # sizes one call covers
PADDINGS = ("circular", "zeros")  # circular: ELS over every patch; zeros: bbELS, the keys of the border class
FIXED_POINT_RANGE = 2.0**31 - 2.0**20   # a window sum of fixed-point squares stays below this (int32 after the
                                        # + 0.5 rounding of up to 64² squares); table entries wrap modulo 2^32


@dataclass
class MultiSizeResult:
    """sizes [S] (increasing); mean [S, B, C, H, W] (float64, size-major); per size the pairs folded and skipped
    and the largest logit error the fixed-point grid can cause; the certified bound on the neglected fraction of
    each (pixel, size)'s mass."""
    sizes: list[int]
    mean: Tensor
    folded: list[int]
    skipped: list[int]
    neglected_bound: float
    logit_error_bound: list[float]


def check_sizes(patch_sizes: Sequence[int]) -> list[int]:
    """The distinct sizes, increasing; ValueError naming them when one is not an odd positive integer."""
    sizes = sorted({int(p) for p in patch_sizes})
    if not sizes or any(p < 1 or p % 2 == 0 for p in sizes):
        raise ValueError(f"patch_sizes must be odd positive integers, got {list(patch_sizes)}")
    return sizes


def covers(images_shape: tuple[int, ...], patch_sizes: Sequence[int]) -> bool:
    """Whether the kernel handles training images of this shape [N, C, H, W] at all of these sizes."""
    _, c, h, w = images_shape
    sizes = list(patch_sizes)
    return (0 < len(sizes) <= MAX_SIZES and all(p % 2 == 1 and 1 <= p <= min(h, w) for p in sizes)
            and w <= box.MAX_WIDTH and 1 <= c <= box.MAX_CHANNELS)


def memory_estimate(batch: int, images_shape: tuple[int, ...], patch_sizes: Sequence[int],
                    threads: int | None = None) -> int:
    """Bytes a call needs beyond its inputs: the double state of every (query pixel, size), and per thread its
    own copy of the state and the kernel's scratch (product image, integral image, lane-wise sums)."""
    _, c, h, w = images_shape
    s, r = len(patch_sizes), max(patch_sizes) // 2
    padded = (w + 7) // 8 * 8
    state = batch * h * w * s * (8 * (2 + c) + 4 * 2)
    scratch = 4 * (c * h * (w + padded) + h * w * padded + (h + 2 * r + 1) * (w + 2 * r + 1) * padded
                   + h * w * s * 8 * (1 + c))
    return state + (threads or torch.get_num_threads()) * (state + scratch)


def fixed_scales(x: Tensor, a: Tensor, images: Tensor, patch_size: int) -> Tensor:
    """Per sample [B], the power-of-two scale of the fixed-point squares at which no P×P window sum (P the
    largest size) exceeds FIXED_POINT_RANGE: `box.fixed_scales`'s rule with the int32 range used in full (the
    integral image is read by differences, so only window sums, not table entries, must fit)."""
    k_max = float(images.abs().max())
    bound = (x.detach().to(torch.float64).abs() + a.to(torch.float64)[:, None, None, None] * k_max) ** 2
    window_max = box.circular_box_sum(bound.sum(1, keepdim=True), patch_size).flatten(1).max(1).values
    return torch.exp2(torch.floor(torch.log2(FIXED_POINT_RANGE / window_max.clamp_min(1e-12))))


def logit_error_bounds(scale: Tensor, alpha_bar: Tensor, patch_sizes: Sequence[int]) -> list[float]:
    """Per size, the largest logit error the fixed-point grid can cause: P²/(2·scale)/(2s²), over samples."""
    s2 = (1 - alpha_bar.to(torch.float64)).clamp_min(1e-30)
    return [float((p**2 / (2 * scale) / (2 * s2)).max()) for p in patch_sizes]


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sf_multisize_posterior.restype = ctypes.c_int
    lib.sf_multisize_posterior.argtypes = ([i64] * 6 + [ptr] * 7 + [ctypes.c_float, ctypes.c_int] + [ptr] * 4
                                           + [ctypes.c_int])


def available() -> bool:
    """True when the compiled multi-size kernel is built, loaded and agrees with the float64 reference."""
    return _KERNEL.available()


def _self_check() -> bool:
    """The kernel against the float64 brute force for every vector count per group G = 1..8 (W = 8G − 3, odd,
    so the last vector has padding lanes), each C = 1..4 with both paddings, three sizes, two noise levels,
    skipping on."""
    gen = torch.Generator().manual_seed(0)
    alpha_bar = torch.tensor([0.4, 0.95], dtype=torch.float64)
    logw = torch.tensor([0.0, -0.5], dtype=torch.float64)
    for g in range(1, 9):
        c, padding, h, w, sizes = (g - 1) % box.MAX_CHANNELS + 1, PADDINGS[g > 4], 5, 8 * g - 3, [1, 3, 5]
        images = torch.rand(2, c, h, w, generator=gen) * 2 - 1
        x = 0.6 * images.flip(0) + 0.5 * torch.randn(2, c, h, w, generator=gen)
        got = _run(x, alpha_bar, images, logw, sizes, box.threshold_for(2 * h * w), padding)
        want = multisize_reference(x, alpha_bar, images, logw, sizes, padding)
        for k in range(len(sizes)):
            bound = 2 * (got.logit_error_bound[k] + got.neglected_bound) * float(images.abs().max()) + 1e-6
            if not (got.mean[k] - want[k]).abs().max() <= bound:
                return False
    return True


def _run(x: Tensor, alpha_bar: Tensor, images: Tensor, log_weights: Tensor, sizes: list[int], threshold: float,
         padding: str = "circular", chunk_images: int | None = None, progress: bool = False) -> MultiSizeResult:
    b, c, h, w = x.shape
    n, s = images.shape[0], len(sizes)
    ab = alpha_bar.to(torch.float64)
    a = ab.sqrt()
    s2 = (1 - ab).clamp_min(1e-30)
    scale = fixed_scales(x, a, images, sizes[-1])
    queries = x.detach().to(torch.float32).contiguous()
    keys = images.detach().to(torch.float32).contiguous()
    logw = log_weights.to(torch.float32).contiguous()
    a32, inv2s2, scale32 = a.to(torch.float32), (1 / (2 * s2)).to(torch.float32), scale.to(torch.float32)
    size_arr = torch.tensor(sizes, dtype=torch.int64)
    m = torch.full((b * h * w * s,), -math.inf, dtype=torch.float64)
    l = torch.zeros(b * h * w * s, dtype=torch.float64)
    acc = torch.zeros(b * h * w * s, c, dtype=torch.float64)
    counts = torch.zeros(s, 2, dtype=torch.int64)
    per_call = chunk_images or max(1, int(box.CHUNK_PAIRS // (s * b * (h * w) ** 2)))
    for start in tqdm(range(0, n, per_call), desc=f"box P={sizes[0]}…{sizes[-1]}", disable=not progress,
                      leave=False):
        stop = min(n, start + per_call)
        code = _KERNEL.library.sf_multisize_posterior(
            b, stop - start, c, h, w, s, size_arr.data_ptr(), queries.data_ptr(), keys[start].data_ptr(),
            logw[start].data_ptr(), a32.data_ptr(), inv2s2.data_ptr(), scale32.data_ptr(), float(threshold),
            int(padding == "zeros"), m.data_ptr(), l.data_ptr(), acc.data_ptr(), counts.data_ptr(),
            torch.get_num_threads())
        if code != 0:
            raise ValueError(f"the multi-size kernel does not cover images {tuple(images.shape)} at sizes {sizes}")
    mean = (acc / l[:, None]).reshape(s, b, h, w, c).permute(0, 1, 4, 2, 3)           # [S, B, C, H, W]
    skipped = counts[:, 1].tolist()
    bound = n * h * w * math.exp(-threshold) if any(skipped) else 0.0
    grid = logit_error_bounds(scale, ab, sizes)
    return MultiSizeResult(sizes, mean, counts[:, 0].tolist(), skipped, bound, grid)


def multisize_posterior(x: Tensor, alpha_bar: Tensor | float, images: Tensor, patch_sizes: Sequence[int], *,
                        padding: str = "circular", log_weights: Tensor | None = None,
                        tolerance: float = box.DEFAULT_TOLERANCE, chunk_images: int | None = None,
                        progress: bool | None = None) -> MultiSizeResult:
    """The posterior mean of noisy images x [B, C, H, W] at ᾱ [B] (or a scalar) over the P×P patches of training
    images [N, C, H, W] (log-weights [N]) at every size of patch_sizes (odd, ≤ min(H, W), W ≤ 64, C ≤ 4), in one
    pass over the images: padding 'circular', ELS over all H·W circular patches (eq. 9–10); 'zeros', bbELS over
    the zero-padded patches of each query pixel's border class at each size (eq. 41). The exp of key groups more
    than threshold_for(N·H·W, tolerance) below a (pixel, size)'s running max is skipped (certified bound in the
    result). Raises RuntimeError when the library is not available."""
    box.check_pair_shapes(x, images)
    sizes = check_sizes(patch_sizes)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if not covers(tuple(images.shape), sizes):
        raise ValueError(f"the multi-size kernel needs odd sizes ≤ min(H, W) (at most {MAX_SIZES}), W ≤ "
                         f"{box.MAX_WIDTH} and C ≤ {box.MAX_CHANNELS}; got patch_sizes {sizes} for images "
                         f"{tuple(images.shape[1:])}")
    if not available():
        raise RuntimeError("the compiled multi-size kernel is not available (see the warning above)")
    b, _, h, w = x.shape
    n = images.shape[0]
    ab, logw = box.float64_inputs(alpha_bar, log_weights, b, n)
    threshold = box.threshold_for(n * h * w, tolerance)
    show = progress if progress is not None else (len(sizes) * b * n * (h * w) ** 2 > 4 * box.CHUNK_PAIRS
                                                  and engine_progress.enabled())
    return _run(x, ab, images, logw, sizes, threshold, padding, chunk_images, show)


def multisize_reference(x: Tensor, alpha_bar: Tensor | float, images: Tensor, log_weights: Tensor | None,
                        patch_sizes: Sequence[int], padding: str = "circular") -> Tensor:
    """Float64 brute force [S, B, C, H, W] at the sizes sorted increasingly, size by size: every patch pair's
    distance in full (`geometry.extract_patches`), with zero padding only the keys of the query pixel's border
    class (`geometry.border_classes`)."""
    b, c, h, w = x.shape
    n = images.shape[0]
    logw = torch.zeros(n, dtype=torch.float64) if log_weights is None \
        else torch.as_tensor(log_weights, dtype=torch.float64).reshape(n)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(b)
    centre = images.to(torch.float64).permute(0, 2, 3, 1).reshape(-1, c)             # [N·H·W, C]
    out = []
    for p in check_sizes(patch_sizes):
        keys = extract_patches(images.to(torch.float64), p, padding).reshape(-1, c * p * p)       # [N·H·W, D]
        queries = extract_patches(x.to(torch.float64), p, padding)                               # [B, H·W, D]
        bias = logw.repeat_interleave(h * w)[None].expand(h * w, -1)                               # [H·W, N·H·W]
        if padding == "zeros":
            cls = border_classes(h, w, p)
            same = (cls[:, None, :] == cls[None, :, :]).all(-1).repeat(1, n)                       # [H·W, N·H·W]
            bias = bias.masked_fill(~same, -math.inf)
        sizes_out = []
        for q, abar in zip(queries, ab, strict=True):
            a, s2 = math.sqrt(float(abar)), max(1 - float(abar), 1e-30)
            dist = torch.cdist(q, a * keys, compute_mode="donot_use_mm_for_euclid_dist") ** 2
            sizes_out.append((torch.softmax(bias - dist / (2 * s2), dim=1) @ centre).T.reshape(c, h, w))
        out.append(torch.stack(sizes_out))
    return torch.stack(out)


_KERNEL = CompiledKernel(SOURCE, _declare, "multi-size box-sum kernel", "one pass per size", _self_check)
