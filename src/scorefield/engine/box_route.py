"""The box-sum route of `PatchPosterior` (the shared circular ELS bank, float32, on the CPU): when to take it
(`uses_box`) and the call itself (`denoise_box`), which runs the compiled kernel of `box`."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import box
from .banks import unique_rows
from .box_torch import box_posterior_torch
from .errors import PatchConfigError, PatchMemoryError
from .flat import FLAT_LOGIT_SPREAD, flat_logit_spread
from .geometry import extract_patches
from .posterior import noise_coefficients

if TYPE_CHECKING:
    from .patch_posterior import PatchPosterior

Tensor = torch.Tensor
HOST = torch.device("cpu")

BOX_MIN_PATCH = 7                        # cross_term='auto' uses box sums from this patch size up,
BOX_UNIQUE_FRACTION = 0.8                # ... and below it when this fraction of sampled patches is distinct
BOX_SAMPLE_IMAGES = 256                  # training images sampled for that fraction
BOX_MAX_LOGIT_ERROR = 2e-4               # ... when the fixed-point grid's bound on a logit's error stays below


def box_eligible(engine: PatchPosterior, x: Tensor, patch_size: int) -> bool:
    """Whether the compiled box kernel covers this engine and call at all."""
    return (torch_box_eligible(engine, patch_size) and engine.dtype == torch.float32 and x.device.type == "cpu"
            and box.covers(tuple(engine.images.shape), patch_size))


def torch_box_eligible(engine: PatchPosterior, patch_size: int) -> bool:
    """Whether the bank is the shared circular bank of all H·W patches that box sums describe (any device)."""
    _, h, w = engine.image_shape
    return (engine.grouping == "shared" and engine.padding == "circular" and not engine.valid_only
            and patch_size <= min(h, w))


def uses_box(engine: PatchPosterior, x: Tensor, ab: Tensor, patch_size: int, differentiable: bool) -> bool:
    """Whether this call runs on the box-sum kernel (see `PatchPosterior`'s `cross_term`)."""
    if differentiable:
        return False    # gradients always take the float64 autograd route, whatever cross_term forces
    eligible = box_eligible(engine, x, patch_size)
    if engine.cross_term == "box":
        if not eligible and not torch_box_eligible(engine, patch_size):
            raise PatchConfigError("cross_term='box' needs the shared circular bank of all H·W patches "
                                   f"(ELS) and an odd P ≤ min(H, W) (the compiled CPU kernel also W ≤ "
                                   f"{box.MAX_WIDTH}); got P={patch_size}, images {engine.image_shape}, grouping "
                                   f"{engine.grouping!r}, padding {engine.padding!r}, device {x.device}")
        return True
    if engine.cross_term == "gemm" or not eligible:
        return False
    if patch_size < BOX_MIN_PATCH and unique_fraction(engine, patch_size) < BOX_UNIQUE_FRACTION:
        return False    # many duplicate patches (MNIST's background): the deduplicated GEMM path folds fewer
    a, s2 = noise_coefficients(ab)
    b, hw = x.shape[0], x.shape[2] * x.shape[3]
    q = extract_patches(x.detach().to(engine.dtype), patch_size, engine.padding).reshape(1, b * hw, -1)
    if flat_logit_spread(q, a.repeat_interleave(hw)[None], s2.repeat_interleave(hw)[None],
                         engine.max_pixel) <= FLAT_LOGIT_SPREAD:
        return False    # the flat shortcut of the GEMM path folds no pairs at all
    with HOST:   # the compiled kernel's own tensors are host memory, whatever the default device
        scale = box.fixed_scales(x, a, engine.images, patch_size)
        grid_error = float((patch_size**2 / (2 * scale) / (2 * s2)).max())
        return grid_error <= BOX_MAX_LOGIT_ERROR and box.available()


def unique_fraction(engine: PatchPosterior, patch_size: int) -> float:
    """Fraction of distinct patches among all H·W circular patches of the first BOX_SAMPLE_IMAGES images
    (cached per patch size): what deduplication would leave of the GEMM path's pairs."""
    cache = engine.unique_fractions
    if patch_size not in cache:
        sample = extract_patches(engine.images[:BOX_SAMPLE_IMAGES], patch_size, engine.padding)
        keys = sample.reshape(-1, sample.shape[-1])
        cache[patch_size] = unique_rows(keys)[0].shape[0] / keys.shape[0]
    return cache[patch_size]


def denoise_box(engine: PatchPosterior, x: Tensor, ab: Tensor, patch_size: int,
                provenance: bool) -> tuple[Tensor, Tensor | None, dict]:
    """(x̂₀ [B, C, H, W] in x's dtype, provenance [B, H, W, 3] or None, stats) on the box-sum route: the compiled
    CPU kernel where it applies, else (another device, float64, no compiler) the batched torch form."""
    n, _, h, w = engine.images.shape
    with HOST:
        compiled = box_eligible(engine, x, patch_size) and box.available()
    if not compiled:
        if provenance:
            raise PatchConfigError("provenance on the box route needs the compiled CPU kernel (float32, CPU); "
                                   "use cross_term='gemm' for provenance here")
        mean = box_posterior_torch(x, ab, engine.images, patch_size, log_weights=engine.log_weights,
                                   chunk_images=engine.chunk_images, memory_budget=engine.memory_budget,
                                   dtype=engine.dtype)
        pairs = x.shape[0] * h * w * n * h * w
        return mean.to(x.dtype), None, {"patch_size": patch_size, "alpha_bar": ab.tolist(), "pairs_evaluated": pairs,
                                        "pairs_total": pairs, "neglected_bound": 0.0, "fraction": 1.0,
                                        "cross_term": "box", "device": str(x.device), "fold": "reference"}
    need = box.memory_estimate(x.shape[0], tuple(engine.images.shape))
    if need > engine.memory_budget:
        raise PatchMemoryError(f"the box-sum kernel needs about {need / 2**20:.2f} MiB for {x.shape[0]} "
                               f"samples, over the memory budget of {engine.memory_budget / 2**20:.2f} MiB")
    with HOST:
        result = box.box_posterior(x, ab, engine.images, patch_size, log_weights=engine.log_weights,
                                   tolerance=engine.box_tolerance, provenance=provenance,
                                   chunk_images=engine.chunk_images, constant=engine.constant_keys(patch_size))
    pairs_total = x.shape[0] * h * w * n * h * w
    stats = {"patch_size": patch_size, "alpha_bar": ab.tolist(), "pairs_evaluated": result.folded,
             "pairs_total": pairs_total, "neglected_bound": result.neglected_bound,
             "fraction": result.folded / max(1, pairs_total), "cross_term": "box", "device": str(x.device),
             "fold": "compiled", "logit_error_bound": result.logit_error_bound}
    return result.mean.to(x.dtype), result.best, stats
