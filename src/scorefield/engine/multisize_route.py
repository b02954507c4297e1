"""The one-pass route of `PatchPosterior` for many patch sizes at once (calibration, kamb-ganguli App. C.2): which
sizes of a call the compiled multi-size kernel of `multisize` takes (`one_pass_sizes`) and the call itself
(`denoise_sizes`). It covers ELS with circular padding (the shared bank of all circular patches) and bbELS with
zero padding (the bank of each query pixel's border class), float32, on the CPU; every other machine (LS, ELS
with zero padding, valid-only banks), dtype or device evaluates its sizes one by one.

A size joins the pass while the fixed-point grid's bound on a logit's error, with the scale set by the largest
size of the pass, stays within MULTISIZE_MAX_LOGIT_ERROR: the largest sizes are dropped first (the scale then
refines for the rest), and at low noise (s² → 0) the pass shrinks to the small sizes or to nothing. The limit is
looser than the single-size box route's (BOX_MAX_LOGIT_ERROR), because one scale serves every size; a logit
error δ moves any weight ratio by at most e^{2δ} − 1 (0.2 % at the limit), and the errors measured against the
float64 brute force are ≤ 1e-5 in x̂₀ (tests/test_multisize.py). When the first step's logits are flat (pure
noise) every size takes the engine's prior-mean shortcut instead, which folds nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import multisize
from .errors import PatchMemoryError
from .flat import FLAT_LOGIT_SPREAD, flat_logit_spread
from .geometry import extract_patches
from .posterior import noise_coefficients

if TYPE_CHECKING:
    from .patch_posterior import PatchPosterior

Tensor = torch.Tensor
HOST = torch.device("cpu")

MULTISIZE_MAX_LOGIT_ERROR = 1e-3     # a size joins the one pass while its grid bound on a logit error stays below


def kernel_padding(engine: PatchPosterior) -> str | None:
    """The kernel's padding mode for this engine's bank ('circular': ELS, 'zeros': bbELS), or None."""
    if engine.valid_only:
        return None
    return {("shared", "circular"): "circular", ("border", "zeros"): "zeros"}.get((engine.grouping, engine.padding))


def multisize_eligible(engine: PatchPosterior, x: Tensor, patch_sizes: Sequence[int]) -> bool:
    """Whether the compiled multi-size kernel covers this engine and call at all (any grid error)."""
    return (kernel_padding(engine) is not None and engine.dtype == torch.float32 and x.device.type == "cpu"
            and engine.images.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and multisize.covers(tuple(engine.images.shape), patch_sizes) and multisize.available())


def one_pass_sizes(engine: PatchPosterior, x: Tensor, ab: Tensor, patch_sizes: Sequence[int]) -> list[int]:
    """The sizes of `patch_sizes` that one pass of the multi-size kernel evaluates for this call (increasing;
    empty when fewer than two qualify): the largest subset of the smallest sizes whose grid bound stays within
    MULTISIZE_MAX_LOGIT_ERROR, unless the call is flat (pure noise: the per-size shortcut folds nothing)."""
    sizes = multisize.check_sizes(patch_sizes)
    if len(sizes) < 2 or not multisize_eligible(engine, x, sizes):
        return []
    a, s2 = noise_coefficients(ab)
    b, hw = x.shape[0], x.shape[2] * x.shape[3]
    q = extract_patches(x.detach().to(engine.dtype), sizes[-1], engine.padding).reshape(1, b * hw, -1)
    if flat_logit_spread(q, a.repeat_interleave(hw)[None], s2.repeat_interleave(hw)[None],
                         engine.max_pixel) <= FLAT_LOGIT_SPREAD:
        return []
    while len(sizes) >= 2:
        scale = multisize.fixed_scales(x, a, engine.images, sizes[-1])
        if multisize.logit_error_bounds(scale, ab, sizes[-1:])[0] <= MULTISIZE_MAX_LOGIT_ERROR:
            return sizes
        sizes = sizes[:-1]
    return []


def denoise_sizes(engine: PatchPosterior, x: Tensor, ab: Tensor, patch_sizes: Sequence[int]) -> dict[int, Tensor]:
    """{P: x̂₀ [B, C, H, W] in x's dtype} at the sizes `one_pass_sizes` picks (possibly none), from one pass per
    slice of samples that fits the engine's memory budget; records one entry in `engine.history` (route
    'box-multisize', the sizes, pairs folded over all sizes, the certified bounds)."""
    with HOST:
        sizes = one_pass_sizes(engine, x, ab, patch_sizes)
    if not sizes:
        return {}
    n, _, h, w = engine.images.shape
    per_sample = multisize.memory_estimate(1, tuple(engine.images.shape), sizes)
    step = int(engine.memory_budget // per_sample)
    if step < 1:
        raise PatchMemoryError(f"the multi-size kernel needs about {per_sample / 2**20:.2f} MiB per sample at "
                               f"{len(sizes)} sizes, over the memory budget of {engine.memory_budget / 2**20:.2f} MiB")
    means, folded, neglected, grid = [], 0, 0.0, [0.0] * len(sizes)
    with HOST:
        for start in range(0, x.shape[0], step):
            result = multisize.multisize_posterior(x[start:start + step], ab[start:start + step], engine.images,
                                                   sizes, padding=kernel_padding(engine),
                                                   log_weights=engine.log_weights,
                                                   tolerance=engine.box_tolerance, chunk_images=engine.chunk_images)
            means.append(result.mean)
            folded += sum(result.folded)
            neglected = max(neglected, result.neglected_bound)
            grid = [max(g, e) for g, e in zip(grid, result.logit_error_bound, strict=True)]
    mean = torch.cat(means, dim=1).to(x.dtype)                                     # [S, B, C, H, W]
    pairs_total = len(sizes) * x.shape[0] * h * w * n * h * w
    stats = {"patch_size": sizes, "alpha_bar": ab.tolist(), "pairs_evaluated": folded, "pairs_total": pairs_total,
             "neglected_bound": neglected, "fraction": folded / max(1, pairs_total), "cross_term": "box-multisize",
             "device": str(x.device), "fold": "compiled", "logit_error_bound": max(grid)}
    engine.last_stats = stats
    engine.history.append(stats)
    return {p: mean[k] for k, p in enumerate(sizes)}
