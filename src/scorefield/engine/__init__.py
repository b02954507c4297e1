"""The patch-posterior engine: every local score machine is a configuration of it.

    x̂₀(x) = Σ_j softmax_j(ℓ_j) ϕ_j(0),   ℓ_j = −‖φ_Ωx − a·ϕ_j‖²/(2s²) + logw_j,   a = √ᾱ, s² = 1−ᾱ

(kamb-ganguli eq. 3–10, 39–41). Modules, in the order data flows through them:

- `geometry`   patch indices, padding, query groups (shared / location / border)
- `banks`      key sources: cached and deduplicated, streamed, whole images, clustered
- `softmax`    the streaming log-sum-exp state, its merge, and the pure-torch reference fold
- `fused`      the compiled CPU fold (`csrc/patch_softmax.cpp`); `kernels.accumulate` picks it or the reference
- `box`        the box-sum cross term of the shared circular bank (`csrc/box_softmax.cpp`)
- `multisize`  every patch size from one pass over the bank (`csrc/multisize_box.cpp`; route: `multisize_route`)
- `build`      compiling, caching, locking and self-checking the compiled kernels
- `pruning`    certified cluster bounds for skipping negligible mass
- `posterior`  the streamed and pruned posterior over a key source, with the exact top-k fix
- `patch_posterior`  `PatchPosterior` (one training set, any patch size, any device) and `image_posterior`
- `errors`     the engine's error types
"""
from __future__ import annotations

from .banks import (
    ASSIGN_CHUNK_KEYS,
    CachedBank,
    ClusteredBank,
    KeySource,
    StreamedPatches,
    WholeImages,
    augment_keys,
    build_cached_bank,
    cluster_bank,
    dedup_bank,
    row_hashes,
    unique_rows,
)
from .errors import PatchConfigError, PatchMemoryError
from .geometry import (
    GROUPINGS,
    PADDINGS,
    GroupBatch,
    border_classes,
    centre_columns,
    check_padding,
    check_patch_size,
    extract_patches,
    gather_patches,
    group_layout,
    patch_index,
)
from .patch_posterior import (
    BOX_MAX_LOGIT_ERROR,
    BOX_MIN_PATCH,
    BOX_SAMPLE_IMAGES,
    BOX_UNIQUE_FRACTION,
    CROSS_TERMS,
    FLAT_LOGIT_SPREAD,
    PRUNE_MIN_KEYS,
    PatchPosterior,
    image_posterior,
)
from .posterior import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TOPK,
    FULL_PASS_FRACTION,
    FULL_PASS_KEYS,
    MAX_QUERY_BLOCK,
    MIN_NOISE_VARIANCE,
    PIECE_KEYS,
    PROGRESS_PAIRS,
    REST_FLOOR,
    SMALL_FOLD_PAIRS,
    Budget,
    augment_queries,
    exact_topk_correction,
    noise_coefficients,
    plan_memory,
    pruned_posterior,
    softmax_posterior,
)

__all__ = [
    "ASSIGN_CHUNK_KEYS", "DEFAULT_MEMORY_BUDGET", "DEFAULT_TOPK", "FLAT_LOGIT_SPREAD", "FULL_PASS_FRACTION",
    "FULL_PASS_KEYS", "GROUPINGS", "MAX_QUERY_BLOCK", "MIN_NOISE_VARIANCE", "PADDINGS", "PIECE_KEYS",
    "PROGRESS_PAIRS", "PRUNE_MIN_KEYS", "BOX_MIN_PATCH", "BOX_MAX_LOGIT_ERROR", "BOX_SAMPLE_IMAGES",
    "BOX_UNIQUE_FRACTION", "CROSS_TERMS", "REST_FLOOR",
    "SMALL_FOLD_PAIRS",
    "Budget", "CachedBank", "ClusteredBank", "GroupBatch", "KeySource", "PatchConfigError", "PatchMemoryError",
    "PatchPosterior", "StreamedPatches", "WholeImages",
    "augment_keys", "augment_queries", "border_classes", "build_cached_bank", "centre_columns", "check_padding",
    "check_patch_size", "cluster_bank", "dedup_bank", "exact_topk_correction", "extract_patches",
    "gather_patches", "group_layout", "image_posterior", "noise_coefficients", "patch_index", "plan_memory",
    "pruned_posterior", "row_hashes", "softmax_posterior", "unique_rows",
]
