"""The box-sum cross term: the ELS posterior (circular padding, one shared bank) with every patch distance as a
box sum (source: `engine/csrc/box_softmax.cpp`).

For a noisy sample x (a = √ᾱ, s² = 1−ᾱ) and a training image K, the squared distance between the query patch at
pixel u and the scaled key patch at v = u − δ (kamb-ganguli eq. 9–10, circular) is the P×P box sum at u of the
image p_δ = Σ_c (x_c − a·K_c(· − δ))². Box sums slide: a (query pixel, key patch) pair costs O(C) for p_δ plus
O(1) adds, whatever the patch size, instead of the O(P²·C) dot product of the GEMM path; and every term is a
non-negative square, so the distance has no cancellation at low noise (no top-k recompute is needed).
The squares are rounded to a fixed-point grid (scale chosen per sample so that a window sum stays below 2^30)
and slid as exact integers, so the sliding sums never drift; the logit error from the grid is at most
P²/(2·scale)/(2s²) per pair (`BoxResult.logit_error_bound`), ≈ 1e-5 at the sizes of the benchmarks.

Keys whose whole group of W displacements lies more than `threshold` below the query pixel's running max are
not exp'd: each weighs below e^−threshold of the final max, so the neglected fraction of the mass is at most
(keys per query)·e^−threshold; `threshold_for` picks the threshold from a tolerance on that fraction.

`box_posterior` is the entry point; `box_posterior_reference` the float64 brute-force oracle of the tests and
of the self-check run once after the library loads. Set `SCOREFIELD_KERNEL=reference` to disable the library.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import progress as engine_progress
from .build import CSRC, CompiledKernel

Tensor = torch.Tensor

SOURCE = CSRC / "box_softmax.cpp"
MAX_WIDTH = 64                  # image widths the kernel covers (lanes run over the W horizontal shifts)
MAX_CHANNELS = 4                # channels it covers (the centre values are summed in registers)
FIXED_POINT_RANGE = 2.0**30     # a window sum of fixed-point squares stays below this (int32 with headroom)
DEFAULT_TOLERANCE = 1e-6        # neglected fraction of each query pixel's posterior mass
CHUNK_PAIRS = 4e9               # (query pixel, key patch) pairs per library call: progress and interrupts



@dataclass
class BoxResult:
    """mean [B, C, H, W] (float64); best [B, H, W, 3] (training image, y, x of each pixel's arg-max key patch)
    or None; pairs folded and skipped; the certified bound on the neglected fraction of each pixel's mass; the
    largest logit error the fixed-point grid can cause."""
    mean: Tensor
    best: Tensor | None
    folded: int
    skipped: int
    neglected_bound: float
    logit_error_bound: float


def covers(images_shape: tuple[int, ...], patch_size: int) -> bool:
    """Whether the kernel handles training images of this shape [N, C, H, W] at this patch size."""
    _, c, h, w = images_shape
    return patch_size % 2 == 1 and patch_size <= min(h, w) and w <= MAX_WIDTH and 1 <= c <= MAX_CHANNELS


def memory_estimate(batch: int, images_shape: tuple[int, ...], threads: int | None = None) -> int:
    """Bytes a call needs beyond its inputs: the double state of every query pixel, and per thread the
    kernel's scratch (row buffers, lane-wise sums) and its own copy of the state."""
    _, c, h, w = images_shape
    padded = (w + 7) // 8 * 8
    lanes = 2 * w if w % 8 == 4 and h % 2 == 0 and w <= 28 else padded  # two vertical shifts per group
    queries = batch * h * w
    state = queries * (8 * (3 + c) + 4 * 2)                              # m, l, acc, best; floor and m (float)
    scratch = 4 * ((c + 1) * h * (w + 3 + padded) + 2 * h * w + h * w * lanes + 2 * w * lanes
                   + h * w * 8 * (1 + c))
    return state + (threads or torch.get_num_threads()) * (state + scratch)


def threshold_for(keys_per_query: int, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """The skip threshold T with (keys per query)·e^−T = tolerance."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must lie in (0, 1), got {tolerance!r}")
    return math.log(keys_per_query) - math.log(tolerance)


def fixed_scales(x: Tensor, a: Tensor, images: Tensor, patch_size: int) -> Tensor:
    """Per sample, the scale of the fixed-point squares: no window sum of (x − a·K)² exceeds
    max_u Σ_window Σ_c (|x_c| + a·max|K|)², which is mapped to at most 2^30 (int32 with headroom). The scale is
    rounded down to a power of two, so that a pixel's output does not move with pixels outside its patch
    (unless a change crosses a power of two): the machine stays local to the rounding, as finite differences
    of receptive fields need."""
    k_max = float(images.abs().max())
    bound = (x.detach().to(torch.float64).abs() + a.to(torch.float64)[:, None, None, None] * k_max) ** 2
    window_max = circular_box_sum(bound.sum(1, keepdim=True), patch_size).flatten(1).max(1).values
    return torch.exp2(torch.floor(torch.log2(FIXED_POINT_RANGE / window_max.clamp_min(1e-12))))


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sf_box_posterior.restype = ctypes.c_int
    lib.sf_box_posterior.argtypes = ([i64] * 6 + [ptr] * 6 + [ctypes.c_float] * 2 + [ptr] * 5
                                     + [i64, ctypes.c_int])


def available() -> bool:
    """True when the compiled box-sum kernel is built, loaded and agrees with the float64 reference."""
    return _KERNEL.available()


def _self_check_shapes() -> list[tuple[int, int, int, int]]:
    """(C, H, W, P) reaching every case of the kernel's dispatch on (vectors per group G, channels C, paired
    layout): unpaired G = 1..8 (odd G at W ≡ 4 mod 8 with H odd: padding lanes; even G: none) and paired G = 1,
    3, 5, 7 (W = 4G, H even: two vertical shifts per group, MNIST's layout at G = 7), each for C = 1..4. Few
    rows keep the brute force fast (P = 5 where they allow it)."""
    unpaired = [(5 if g <= 2 else 3, 8 * g - 4 * (g % 2)) for g in range(1, 9)]
    paired = [(4, 4 * g) for g in (1, 3, 5, 7)]
    return [(c, h, w, 5 if min(h, w) >= 5 and c % 2 == 0 else 3) for h, w in unpaired + paired
            for c in range(1, MAX_CHANNELS + 1)]


def _self_check() -> bool:
    """The kernel against the float64 brute force on every case of its dispatch (`_self_check_shapes`), at two
    noise levels, with skipping on (the threshold of `DEFAULT_TOLERANCE`) and, at C = 1, constant key patches
    merged (the kernel's const_value branch). Calls `_run`, not `box_posterior`: the kernel is not yet
    `available()` while it is being checked."""
    gen = torch.Generator().manual_seed(0)
    alpha_bar = torch.tensor([0.4, 0.95], dtype=torch.float64)
    logw = torch.tensor([0.0, -0.5], dtype=torch.float64)
    for c, h, w, p in _self_check_shapes():
        images = torch.rand(2, c, h, w, generator=gen) * 2 - 1
        if c == 1:
            images[:, :, :p] = 0.0      # rows of zeros: whole constant key patches
        x = 0.6 * images.flip(0) + 0.5 * torch.randn(2, c, h, w, generator=gen)
        constant = constant_keys(images, logw, p, 0.0 if c == 1 else None)
        got = _run(x, alpha_bar, images, logw, p, threshold_for(2 * h * w), provenance=False, constant=constant)
        want = box_posterior_reference(x, alpha_bar, images, logw, p)
        # logits off by ≤ ε (grid) and a mass fraction η skipped move the mean by ≤ 2(ε + η)·max|K|, plus float32
        bound = 2 * (got.logit_error_bound + got.neglected_bound) * float(images.abs().max()) + 1e-6
        if not (got.mean - want).abs().max() <= bound:
            return False
    return True


@dataclass
class ConstantKeys:
    """The key patches equal to `value` at every pixel and channel, merged into one key: their summed
    log-weight log Σ_n count_n·w_n and the flat index of the first one (its provenance)."""
    value: float
    log_weight: float
    first: int

    def logits(self, x: Tensor, a: Tensor, s2: Tensor, patch_size: int) -> Tensor:
        """[B, H, W]: log_weight − Σ_window Σ_c (x_c − a·value)² / 2s², in float64 (circular windows)."""
        sq = ((x.to(torch.float64) - a[:, None, None, None] * self.value) ** 2).sum(1, keepdim=True)
        return self.log_weight - circular_box_sum(sq, patch_size)[:, 0] / (2 * s2[:, None, None])


def circular_box_sum(t: Tensor, patch_size: int) -> Tensor:
    """P×P window sums, centred, with circular wrap: [M, C, H, W] -> [M, C, H, W]."""
    r = patch_size // 2
    padded = torch.nn.functional.pad(t, (r, r, r, r), mode="circular")
    cum = padded.cumsum(2).cumsum(3)
    cum = torch.nn.functional.pad(cum, (1, 0, 1, 0))
    p = patch_size
    return cum[..., p:, p:] - cum[..., :-p, p:] - cum[..., p:, :-p] + cum[..., :-p, :-p]


def most_frequent_value(images: Tensor) -> float:
    """The pixel value that occurs most often (MNIST's background), the candidate for constant key patches."""
    values, counts = torch.unique(images.detach().reshape(-1), return_counts=True)
    return float(values[counts.argmax()])


def constant_keys(images: Tensor, log_weights: Tensor, patch_size: int,
                  value: float | None) -> ConstantKeys | None:
    """The constant key patches at `value` (None: no merging), or None when there are none."""
    if value is None or not math.isfinite(value):
        return None
    differs = (images.detach() != value).any(1, keepdim=True).to(torch.float64)     # [N, 1, H, W]
    constant = circular_box_sum(differs, patch_size)[:, 0] < 0.5                       # [N, H, W]
    per_image = constant.flatten(1).sum(1)
    if int(per_image.sum()) == 0:
        return None
    used = per_image > 0
    log_weight = float(torch.logsumexp(log_weights[used] + per_image[used].to(torch.float64).log(), 0))
    first = int(torch.nonzero(constant.reshape(-1))[0])
    return ConstantKeys(float(value), log_weight, first)


def _run(x: Tensor, alpha_bar: Tensor, images: Tensor, log_weights: Tensor, patch_size: int, threshold: float,
         provenance: bool, chunk_images: int | None = None, progress: bool = False,
         constant: ConstantKeys | None = None) -> BoxResult:
    b, c, h, w = x.shape
    n = images.shape[0]
    ab = alpha_bar.to(torch.float64)
    a = ab.sqrt()
    s2 = (1 - ab).clamp_min(1e-30)
    scale = fixed_scales(x, a, images, patch_size)
    queries = x.detach().to(torch.float32).contiguous()
    keys = images.detach().to(torch.float32).contiguous()
    logw = log_weights.to(torch.float32).contiguous()
    a32, inv2s2 = a.to(torch.float32), (1 / (2 * s2)).to(torch.float32)
    scale32 = scale.to(torch.float32)
    m = torch.full((b * h * w,), -math.inf, dtype=torch.float64)
    l = torch.zeros(b * h * w, dtype=torch.float64)
    acc = torch.zeros(b * h * w, c, dtype=torch.float64)
    best = torch.full((b * h * w,), -1, dtype=torch.int64)
    counts = torch.zeros(2, dtype=torch.int64)
    if constant is not None:   # all constant key patches as one key of log-weight log Σ_n count_n·w_n
        m[:] = constant.logits(x, a, s2, patch_size).reshape(-1)
        l[:] = 1.0
        acc[:] = constant.value
        best[:] = constant.first
        counts[0] += b * h * w
    per_call = chunk_images or max(1, int(CHUNK_PAIRS // (b * (h * w) ** 2)))
    starts = range(0, n, per_call)
    for start in tqdm(starts, desc=f"box P={patch_size}", disable=not progress, leave=False):
        stop = min(n, start + per_call)
        code = _KERNEL.library.sf_box_posterior(
            b, stop - start, c, h, w, patch_size, queries.data_ptr(), keys[start].data_ptr(),
            logw[start].data_ptr(), a32.data_ptr(), inv2s2.data_ptr(), scale32.data_ptr(), float(threshold),
            float("nan") if constant is None else constant.value,
            m.data_ptr(), l.data_ptr(), acc.data_ptr(), best.data_ptr(), counts.data_ptr(), start,
            torch.get_num_threads())
        if code != 0:
            raise ValueError(f"the box-sum kernel does not cover images {tuple(images.shape)} at P={patch_size}")
    mean = (acc / l[:, None]).reshape(b, h, w, c).permute(0, 3, 1, 2)
    folded, skipped = int(counts[0]), int(counts[1])
    keys_per_query = n * h * w
    bound = keys_per_query * math.exp(-threshold) if skipped else 0.0
    grid = float((patch_size**2 / (2 * scale) / (2 * s2)).max())
    where = _key_coordinates(best, h, w).reshape(b, h, w, 3) if provenance else None
    return BoxResult(mean, where, folded, skipped, bound, grid)


def _key_coordinates(flat: Tensor, h: int, w: int) -> Tensor:
    """Flat key indices (n·H + y)·W + x -> [..., 3] (n, y, x)."""
    return torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=-1)


def check_pair_shapes(x: Tensor, images: Tensor) -> None:
    """Noisy images x [B, C, H, W] and training images [N, C, H, W] of the same image shape, or ValueError."""
    if x.ndim != 4 or images.ndim != 4 or tuple(x.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"x {tuple(x.shape)} and images {tuple(images.shape)} must be [B|N, C, H, W] alike")


def float64_inputs(alpha_bar: float | Tensor, log_weights: Tensor | None, b: int,
                   n: int) -> tuple[Tensor, Tensor]:
    """ᾱ (a scalar or [B]) as float64 [B], and the per-image log-weights as float64 [N] (zeros when None)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(b)
    logw = torch.zeros(n, dtype=torch.float64) if log_weights is None \
        else torch.as_tensor(log_weights, dtype=torch.float64).reshape(n)
    return ab, logw


def box_posterior(x: Tensor, alpha_bar: Tensor | float, images: Tensor, patch_size: int, *,
                  log_weights: Tensor | None = None, tolerance: float = DEFAULT_TOLERANCE,
                  provenance: bool = False, chunk_images: int | None = None,
                  progress: bool | None = None, constant_value: float | str | None = "auto",
                  constant: ConstantKeys | None = None) -> BoxResult:
    """The ELS posterior mean (circular padding) of noisy images x [B, C, H, W] at ᾱ [B] (or a scalar) over all
    H·W circular P×P patches of training images [N, C, H, W] with per-image log-weights [N], by the compiled
    box-sum kernel; the exp of key groups more than threshold_for(N·H·W, tolerance) below a pixel's running max
    is skipped (certified bound in the result). Key patches constant at constant_value ('auto': the most frequent
    pixel value; None: off) are merged into one key with their multiplicity (exact), so they are not folded one
    by one; `constant` passes them precomputed (`constant_keys`). Raises RuntimeError when the library is not
    available."""
    check_pair_shapes(x, images)
    if not covers(tuple(images.shape), patch_size):
        raise ValueError(f"the box-sum kernel needs an odd P ≤ min(H, W) and W ≤ {MAX_WIDTH}; got P={patch_size} "
                         f"for images {tuple(images.shape[1:])}")
    if not available():
        raise RuntimeError("the compiled box-sum kernel is not available (see the warning above)")
    b, _, h, w = x.shape
    n = images.shape[0]
    ab, logw = float64_inputs(alpha_bar, log_weights, b, n)
    threshold = threshold_for(n * h * w, tolerance)
    show = progress if progress is not None else (b * n * (h * w) ** 2 > 4 * CHUNK_PAIRS
                                                  and engine_progress.enabled())
    if constant is None:
        if constant_value == "auto":
            constant_value = most_frequent_value(images)
        constant = constant_keys(images, logw, patch_size, constant_value)
    return _run(x, ab, images, logw, patch_size, threshold, provenance, chunk_images, show, constant)


def box_posterior_reference(x: Tensor, alpha_bar: Tensor, images: Tensor, log_weights: Tensor,
                            patch_size: int) -> Tensor:
    """Float64 brute force of the same posterior mean [B, C, H, W]: every patch pair's distance in full."""
    b, c, h, w = x.shape
    pad = patch_size // 2

    def patches(t: Tensor) -> Tensor:   # [M, H·W, C·P²], circular
        t = torch.nn.functional.pad(t.to(torch.float64), (pad, pad, pad, pad), mode="circular")
        return torch.nn.functional.unfold(t, patch_size).transpose(1, 2)

    keys = patches(images).reshape(-1, c * patch_size**2)                       # [N·H·W, D]
    centre = images.to(torch.float64).permute(0, 2, 3, 1).reshape(-1, c)        # [N·H·W, C]
    logw = torch.as_tensor(log_weights, dtype=torch.float64).repeat_interleave(h * w)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(b)
    out = []
    for q, abar in zip(patches(x), ab, strict=True):
        a, s2 = math.sqrt(float(abar)), max(1 - float(abar), 1e-30)
        dist = torch.cdist(q, a * keys, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        weights = torch.softmax(logw - dist / (2 * s2), dim=1)
        out.append((weights @ centre).T.reshape(c, h, w))
    return torch.stack(out)


_KERNEL = CompiledKernel(SOURCE, _declare, "box-sum kernel", "the GEMM path", _self_check)
