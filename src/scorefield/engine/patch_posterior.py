"""The patch bank and the streaming patch-posterior kernel that all local score machines share.

Every machine of kamb-ganguli (IS eq. 3–4, ES eq. 5–6, LS eq. 7–8, ELS eq. 9–10 / 39–40, boundary-broken ELS
eq. 41) and the patch models of the criticality paper (eq. 9, App. E.4) output, at each query pixel x, the
posterior mean of a bank's centre pixels:

    x̂₀(x) = Σ_j softmax_j(ℓ_j) ϕ_j(0),   ℓ_j = −‖φ_Ωx − a·ϕ_j‖²/(2s²) + logw_j,   a = √ᾱ, s² = 1−ᾱ.

Up to the per-query constant ‖φ_Ωx‖²/(2s²), which the softmax ignores, ℓ_j = (a/s²)·q·k_j − (a²/2s²)‖k_j‖² +
logw_j: an attention score. Because ᾱ differs per sample, both coefficients are folded into an augmented
query [q·a/s², −a²/2s²] against an augmented key [k, ‖k‖²], so one GEMM serves a whole mixed-noise batch.
The sum runs as an exact streaming log-sum-exp (`kernels.accumulate`) over chunks of training images whose
patches are cut on the fly, so memory is bounded whatever the dataset size; small banks are built once,
deduplicated (identical patches merge into one key with log-multiplicity, which is exact) and cached.

The float32 expansion cancels catastrophically at low noise; the float32 path therefore tracks each query's
top keys and recomputes their logits exactly, in float64 and distance form, before normalizing.

Doing less, exactly: when every logit equals its log-weight to within FLAT_LOGIT_SPREAD (the first steps from
pure noise) the posterior is the bank's prior mean, computed once; with `prune`, the shared bank is clustered
once per patch size and whole clusters are skipped per query under a certified bound on the neglected mass
(`pruning`). Every call records the pairs it folded and that bound (`PatchPosterior.last_stats`).

Which keys a query may use is its *group*: one bank for all pixels (ELS), one bank per location (LS), one bank
per border class (boundary-broken ELS, App. B.2 and Fig. 9).

The engine is split by concern: `patch_geometry` (patch indices and query groups), `banks` (the key sources,
cached, streamed, whole-image and clustered), `posterior` (the streaming and pruned softmax posterior) and
`patch_errors`; this module holds the engine (`PatchPosterior`, `image_posterior`) and re-exports their names.
"""
from __future__ import annotations

import math

import torch

from . import box as boxkernel
from . import kernels, pruning
from .banks import (
    ASSIGN_CHUNK_KEYS,
    CachedBank,
    ClusteredBank,
    KeySource,
    StreamedPatches,
    WholeImages,
    _held_bytes,
    build_cached_bank,
    cluster_bank,
    unique_rows,
)
from .errors import PatchConfigError, PatchMemoryError
from .geometry import (
    GROUPINGS,
    GroupBatch,
    check_padding,
    check_patch_size,
    extract_patches,
    group_layout,
)
from .posterior import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TOPK,
    noise_coefficients,
    pruned_posterior,
    softmax_posterior,
)

Tensor = torch.Tensor

PRUNE_MIN_KEYS = 8192                    # prune='auto' clusters banks of at least this many keys
CROSS_TERMS = ("auto", "box", "gemm")
BOX_MIN_PATCH = 7                        # cross_term='auto' uses box sums from this patch size up,
BOX_UNIQUE_FRACTION = 0.8                # ... and below it when this fraction of sampled patches is distinct
BOX_SAMPLE_IMAGES = 256                  # training images sampled for that fraction
BOX_MAX_LOGIT_ERROR = 2e-4               # ... when the fixed-point grid's bound on a logit's error stays below
FLAT_LOGIT_SPREAD = 1e-9                 # below this logit spread the posterior is the bank's prior mean


class PatchPosterior:
    """The patch-posterior engine of one training set.

    images: [N, C, H, W]; log_weights: [N] per-image log-weight (default 0); grouping: 'shared' (ELS),
    'location' (LS) or 'border' (bbELS); padding: 'zeros' or 'circular' (applied to queries and bank alike,
    as in a padded CNN); valid_only: bank of patches that fit inside the image only (the released code's
    ELS bank; off by default — the theory, App. B.1, uses all H·W patches).
    cache: 'auto' (build, deduplicate and keep the bank per patch size when it fits a quarter of the memory
    budget), True, or False (always stream). chunk_images: training images per streamed chunk (default: from
    the memory budget). dtype: float32 (fast, exact top-k fix) or float64 (reference).
    prune: True, 'auto' (only banks of at least PRUNE_MIN_KEYS keys) or False (default): cluster the shared bank
    once per patch size (`cluster_bank`) and skip, per query, the clusters whose certified bound on mass is
    below `prune_tolerance` of the total (`pruned_posterior`). Off by default: exact to the bound, but on the
    CPU the fused kernel folds small patches faster than the bound pass and the per-cluster folds cost, and
    at large patches and high noise the bounds skip little. `last_stats` holds the last call's pairs
    evaluated, pairs of the raw bank and the largest bound on the neglected fraction of the mass;
    `history` one such dict per call. stream_dedup: merge the identical keys of each streamed chunk into one
    key of log-weight logsumexp(logw) before folding it (exact; provenance is the first occurrence in the
    chunk; pairs evaluated count the merged keys).
    cross_term: how the distances of the shared circular bank (ELS) are computed: 'gemm' (the attention-style
    dot products above), 'box' (`box`: every distance as a sliding box sum, O(1) per pair whatever P;
    exp skipped for key groups below box_tolerance of a pixel's mass, with a certified bound) or 'auto' (box
    sums from BOX_MIN_PATCH up when the compiled kernel is available, the call needs no gradient and the
    fixed-point grid's logit error bound stays below BOX_MAX_LOGIT_ERROR; below BOX_MIN_PATCH only when at least
    BOX_UNIQUE_FRACTION of a sample of the patches are distinct; float64 engines always use 'gemm').
    """

    def __init__(self, images: Tensor, *, grouping: str = "shared", padding: str = "circular",
                 log_weights: Tensor | None = None, valid_only: bool = False,
                 dtype: torch.dtype = torch.float32, chunk_images: int | None = None,
                 memory_budget: float = DEFAULT_MEMORY_BUDGET, cache: bool | str = "auto",
                 topk: int = DEFAULT_TOPK, prune: bool | str = False,
                 prune_tolerance: float = pruning.DEFAULT_TOLERANCE, clusters: int | None = None,
                 stream_dedup: bool = True, cross_term: str = "auto",
                 box_tolerance: float = boxkernel.DEFAULT_TOLERANCE) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise PatchConfigError(f"the bank needs images [N>0, C, H, W], got shape {tuple(images.shape)}")
        if grouping not in GROUPINGS:
            raise PatchConfigError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        if dtype not in (torch.float32, torch.float64):
            raise PatchConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if chunk_images is not None and (int(chunk_images) != chunk_images or chunk_images < 1):
            raise PatchConfigError(f"chunk_images must be a positive integer, got {chunk_images!r}")
        if cache not in ("auto", True, False):
            raise PatchConfigError(f"cache must be 'auto', True or False, got {cache!r}")
        self.images = images.detach().to(torch.float32).contiguous()
        n = self.images.shape[0]
        self.log_weights = (torch.zeros(n) if log_weights is None
                            else torch.as_tensor(log_weights, dtype=torch.float64).reshape(n))
        self.grouping, self.padding = grouping, check_padding(padding)
        self.valid_only, self.dtype, self.topk = bool(valid_only), dtype, int(topk)
        self.chunk_images, self.memory_budget, self.cache = chunk_images, float(memory_budget), cache
        if prune not in ("auto", True, False):
            raise PatchConfigError(f"prune must be 'auto', True or False, got {prune!r}")
        if clusters is not None and (int(clusters) != clusters or clusters < 1):
            raise PatchConfigError(f"clusters must be a positive integer, got {clusters!r}")
        self.prune, self.prune_tolerance = prune, pruning.check_tolerance(prune_tolerance)
        self.clusters = clusters
        self.stream_dedup = bool(stream_dedup)
        if cross_term not in CROSS_TERMS:
            raise PatchConfigError(f"cross_term must be one of {CROSS_TERMS}, got {cross_term!r}")
        self.cross_term = cross_term
        self.box_tolerance = float(box_tolerance)
        boxkernel.threshold_for(2, self.box_tolerance)   # validates the tolerance
        self.last_stats: dict = {}
        self.history: list[dict] = []
        self._layouts: dict[int, list[GroupBatch]] = {}
        self._banks: dict[tuple[int, int], KeySource] = {}
        self._prior_means: dict[tuple[int, int], Tensor] = {}
        self._unique_fractions: dict[int, float] = {}
        self._constant_value: float | None = None
        self._constant_keys: dict[int, boxkernel.ConstantKeys | None] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def layout(self, patch_size: int) -> list[GroupBatch]:
        if patch_size not in self._layouts:
            _, h, w = self.image_shape
            self._layouts[patch_size] = group_layout(self.grouping, h, w, patch_size, self.valid_only)
        return self._layouts[patch_size]

    def bank(self, patch_size: int, batch_index: int) -> KeySource:
        """The key source of one group batch: cached (deduplicated) when it fits, else streamed."""
        key = (patch_size, batch_index)
        if key in self._banks:
            return self._banks[key]
        gb = self.layout(patch_size)[batch_index]
        stream = StreamedPatches(self.images, self.log_weights, patch_size, self.padding, gb.key_locs)
        stream.dedup = self.stream_dedup
        raw_bytes = stream.groups * stream.num_keys * (stream.dim + stream.value_dim + 8) * 4
        use_cache = self.cache is True or (self.cache == "auto" and 8 * raw_bytes <= self.memory_budget)
        if self.cache is True and 4 * raw_bytes > self.memory_budget:
            raise PatchMemoryError(f"caching the {patch_size}×{patch_size} bank needs about "
                                   f"{4 * raw_bytes / 2**20:.0f} MiB, over the memory budget of "
                                   f"{self.memory_budget / 2**20:.0f} MiB; use cache='auto' or False")
        if use_cache or self._prunes(stream):
            stream.dedup = False
        source: KeySource = build_cached_bank(stream) if use_cache else stream
        if self._prunes(source):
            source = cluster_bank(source, self.clusters)
        self._banks[key] = source
        self._prior_means.pop(key, None)
        # a sampler walks through the patch sizes in order: keep the held banks within a quarter of the budget
        while len(self._banks) > 1 and sum(_held_bytes(b) for b in self._banks.values()) > self.memory_budget / 4:
            del self._banks[next(iter(self._banks))]
        return source

    def _prunes(self, source: KeySource) -> bool:
        if self.prune is False or source.groups != 1:
            return False
        return self.prune is True or source.num_keys >= PRUNE_MIN_KEYS

    def __call__(self, x: Tensor, alpha_bar: Tensor | float, patch_size: int,
                 return_provenance: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior-mean image [B, C, H, W] of noisy images x [B, C, H, W] at ᾱ [B] (or a scalar); with
        return_provenance also [B, H, W, 3] (training image, y, x) of each pixel's arg-max bank patch."""
        patch_size = check_patch_size(patch_size)
        if tuple(x.shape[1:]) != self.image_shape:
            raise PatchConfigError(f"x has image shape {tuple(x.shape[1:])}, the bank {self.image_shape}")
        b = x.shape[0]
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(b)
        per_pass = self.samples_per_pass(patch_size)
        if b > per_pass:   # the queries of all samples would not fit: denoise the batch in slices
            parts = [self._denoise(x[i:i + per_pass], ab[i:i + per_pass], patch_size, return_provenance)
                     for i in range(0, b, per_pass)]
            if return_provenance:
                return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            return torch.cat(parts)
        return self._denoise(x, ab, patch_size, return_provenance)

    def samples_per_pass(self, patch_size: int) -> int:
        """How many samples' query patches fit in half the memory budget at once."""
        c, h, w = self.image_shape
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_sample = h * w * (3 * (c * patch_size**2 + 1) + c + 2 + 2 * self.topk) * itemsize
        return max(1, int(self.memory_budget // (2 * per_sample)))

    def _flat_logit_spread(self, q: Tensor, a: Tensor, s2: Tensor, patch_size: int) -> float:
        """max over queries and keys of |(a/s²)·q·k − (a²/2s²)‖k‖²|, bounded with ‖k‖ ≤ √D·max|pixel|."""
        k_max = math.sqrt(q.shape[-1]) * float(self.images.abs().max())
        q_norm = q.double().norm(dim=-1)                                              # [G, Q]
        return float(((a / s2) * q_norm * k_max + (a * a) / (2 * s2) * k_max**2).max())

    def _prior_mean(self, patch_size: int, batch_index: int) -> Tensor:
        """Σ_k w_k v_k / Σ_k w_k of a bank (float64 [G, V], cached): the posterior mean when logits are flat."""
        key = (patch_size, batch_index)
        if key not in self._prior_means and self.grouping == "shared" and self.padding == "circular" \
                and not self.valid_only:
            # every pixel of every image is the centre of exactly one of its H·W circular patches: the prior
            # mean is the log-weighted mean of the images' mean pixels, in O(N·H·W)
            weights = torch.softmax(self.log_weights.to(torch.float64), 0)                      # [N]
            pixel_means = self.images.to(torch.float64).mean(dim=(2, 3))                        # [N, C]
            self._prior_means[key] = (weights @ pixel_means)[None].to(self.dtype)               # [1, C]
        if key not in self._prior_means:
            source = self.bank(patch_size, batch_index)
            source.set_chunk_keys(min(source.num_keys, ASSIGN_CHUNK_KEYS))
            state = kernels.init_state((source.groups, 1), source.value_dim, torch.float64)
            zero = torch.zeros(source.groups, 1, source.dim + 1, dtype=torch.float64)
            for _, k_aug, logw, values in source.augmented_chunks(torch.float64):
                state = kernels.accumulate_reference(state, zero, k_aug, logw, values, 1.0)
            self._prior_means[key] = kernels.finalize(state)[:, 0].to(self.dtype)
        return self._prior_means[key]

    def _denoise(self, x: Tensor, ab: Tensor, patch_size: int,
                 return_provenance: bool) -> Tensor | tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if self._uses_box(x, ab, patch_size):
            return self._denoise_box(x, ab, patch_size, return_provenance)
        a, s2 = noise_coefficients(ab)
        queries = extract_patches(x.detach().to(self.dtype), patch_size, self.padding)   # [B, HW, D]
        out = torch.empty(b, h * w, c, dtype=self.dtype)
        prov = torch.full((b, h * w, 3), -1, dtype=torch.int64)
        stats = {"patch_size": patch_size, "alpha_bar": ab.tolist(), "pairs_evaluated": 0, "pairs_total": 0,
                 "neglected_bound": 0.0}
        for i, gb in enumerate(self.layout(patch_size)):
            source = self.bank(patch_size, i)
            lq = gb.query_locs.shape[1]
            q = queries[:, gb.query_locs].permute(1, 0, 2, 3).reshape(gb.groups, b * lq, -1)  # [G, B·Lq, D]
            a_q = a[:, None].expand(b, lq).reshape(1, -1).expand(gb.groups, -1)
            s2_q = s2[:, None].expand(b, lq).reshape(1, -1).expand(gb.groups, -1)
            chunk = None if self.chunk_images is None or isinstance(source, CachedBank) \
                else self.chunk_images * gb.key_locs.shape[1]
            raw = getattr(source, "raw_keys", source.num_keys)
            spread = self._flat_logit_spread(q, a_q, s2_q, patch_size)
            if not return_provenance and spread <= FLAT_LOGIT_SPREAD:
                # every logit equals logw to within `spread`: the posterior is the prior mean of the bank,
                # exact up to a relative weight error e^{2·spread} − 1 (the first steps from pure noise)
                mean = self._prior_mean(patch_size, i)[:, None, :].expand(gb.groups, q.shape[1], c)
                best, part = None, {"pairs_evaluated": 0, "pairs_total": q.shape[1] * raw * gb.groups,
                                    "neglected_bound": math.expm1(2 * spread)}
            elif isinstance(source, ClusteredBank):
                mean, best, part = pruned_posterior(q, a_q, s2_q, source, dtype=self.dtype, topk=self.topk,
                                                    provenance=return_provenance, tolerance=self.prune_tolerance,
                                                    memory_budget=self.memory_budget)
            else:
                mean, best = softmax_posterior(q, a_q, s2_q, source, dtype=self.dtype, topk=self.topk,
                                               provenance=return_provenance, memory_budget=self.memory_budget,
                                               chunk_keys=chunk)
                part = {"pairs_evaluated": q.shape[1] * source.folded_keys * gb.groups,
                        "pairs_total": q.shape[1] * raw * gb.groups, "neglected_bound": 0.0}
            stats["pairs_evaluated"] += part["pairs_evaluated"]
            stats["pairs_total"] += part["pairs_total"]
            stats["neglected_bound"] = max(stats["neglected_bound"], part["neglected_bound"])
            locs = gb.query_locs.T                                                   # [Lq, G]
            out[:, locs] = mean.reshape(gb.groups, b, lq, c).permute(1, 2, 0, 3)
            if return_provenance:
                prov[:, locs] = source.sources(best).reshape(gb.groups, b, lq, 3).permute(1, 2, 0, 3)
        stats["fraction"] = stats["pairs_evaluated"] / max(1, stats["pairs_total"])
        stats["cross_term"] = "gemm"
        self.last_stats = stats
        self.history.append(stats)
        result = out.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)
        if return_provenance:
            return result, prov.reshape(b, h, w, 3)
        return result


    def _uses_box(self, x: Tensor, ab: Tensor, patch_size: int) -> bool:
        """Whether this call runs on the box-sum kernel (see `cross_term`)."""
        b = x.shape[0]
        eligible = (self.grouping == "shared" and self.padding == "circular" and not self.valid_only
                    and self.dtype == torch.float32 and x.device.type == "cpu"
                    and boxkernel.covers(tuple(self.images.shape), patch_size))
        if self.cross_term == "box":
            if not eligible:
                raise PatchConfigError("cross_term='box' needs the shared circular bank of all H·W patches "
                                       f"(ELS), float32 on the CPU, an odd P ≤ min(H, W) and W ≤ "
                                       f"{boxkernel.MAX_WIDTH}; got P={patch_size}, images "
                                       f"{self.image_shape}, grouping {self.grouping!r}, padding {self.padding!r}")
            return True
        if self.cross_term == "gemm" or not eligible or x.requires_grad:
            return False
        if patch_size < BOX_MIN_PATCH and self.unique_fraction(patch_size) < BOX_UNIQUE_FRACTION:
            return False    # many duplicate patches (MNIST's background): the deduplicated GEMM path folds fewer
        a, s2 = noise_coefficients(ab)
        hw = x.shape[2] * x.shape[3]
        q = extract_patches(x.detach().to(self.dtype), patch_size, self.padding).reshape(1, b * hw, -1)
        if self._flat_logit_spread(q, a.repeat_interleave(hw)[None], s2.repeat_interleave(hw)[None],
                                   patch_size) <= FLAT_LOGIT_SPREAD:
            return False    # the flat shortcut of the GEMM path folds no pairs at all
        scale = boxkernel.fixed_scales(x, a, self.images, patch_size)
        grid_error = float((patch_size**2 / (2 * scale) / (2 * s2)).max())
        return grid_error <= BOX_MAX_LOGIT_ERROR and boxkernel.available()

    def unique_fraction(self, patch_size: int) -> float:
        """Fraction of distinct patches among all H·W circular patches of the first BOX_SAMPLE_IMAGES images
        (cached per patch size): what deduplication would leave of the GEMM path's pairs."""
        if patch_size not in self._unique_fractions:
            sample = extract_patches(self.images[:BOX_SAMPLE_IMAGES], patch_size, self.padding)
            keys = sample.reshape(-1, sample.shape[-1])
            self._unique_fractions[patch_size] = unique_rows(keys)[0].shape[0] / keys.shape[0]
        return self._unique_fractions[patch_size]

    def _denoise_box(self, x: Tensor, ab: Tensor, patch_size: int,
                     return_provenance: bool) -> Tensor | tuple[Tensor, Tensor]:
        n, _, h, w = self.images.shape
        need = boxkernel.memory_estimate(x.shape[0], tuple(self.images.shape))
        if need > self.memory_budget:
            raise PatchMemoryError(f"the box-sum kernel needs about {need / 2**20:.2f} MiB for {x.shape[0]} "
                                   f"samples, over the memory budget of {self.memory_budget / 2**20:.2f} MiB")
        if patch_size not in self._constant_keys:     # the bank's constant patches, merged once per patch size
            if self._constant_value is None:
                self._constant_value = boxkernel.most_frequent_value(self.images)
            self._constant_keys[patch_size] = boxkernel.constant_keys(
                self.images, self.log_weights.to(torch.float64), patch_size, self._constant_value)
        result = boxkernel.box_posterior(x, ab, self.images, patch_size, log_weights=self.log_weights,
                                         tolerance=self.box_tolerance, provenance=return_provenance,
                                         chunk_images=self.chunk_images, constant=self._constant_keys[patch_size])
        pairs_total = x.shape[0] * h * w * n * h * w
        stats = {"patch_size": patch_size, "alpha_bar": ab.tolist(), "pairs_evaluated": result.folded,
                 "pairs_total": pairs_total, "neglected_bound": result.neglected_bound,
                 "fraction": result.folded / max(1, pairs_total), "cross_term": "box",
                 "logit_error_bound": result.logit_error_bound}
        self.last_stats = stats
        self.history.append(stats)
        mean = result.mean.to(x.dtype)
        if return_provenance:
            return mean, result.best
        return mean


def image_posterior(x: Tensor, alpha_bar: Tensor | float, images: Tensor, *, translates: bool = False,
                    log_weights: Tensor | None = None, dtype: torch.dtype = torch.float32,
                    topk: int = DEFAULT_TOPK, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                    chunk_images: int | None = None, return_provenance: bool = False,
                    ) -> Tensor | tuple[Tensor, Tensor]:
    """Posterior mean over whole training images [N, C, H, W] (IS, kamb-ganguli eq. 3–4), or over all their
    circular translates (ES, eq. 5–6), of noisy images x [B, C, H, W] at ᾱ [B]; streamed in chunks of images,
    so memory is bounded for any N. With return_provenance also [B, 3] (image, shift y, shift x)."""
    b = x.shape[0]
    n = images.shape[0]
    logw = torch.zeros(n) if log_weights is None else torch.as_tensor(log_weights, dtype=torch.float64)
    source = WholeImages(images.detach().to(torch.float32), logw, translates=translates)
    a, s2 = noise_coefficients(torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(b))
    chunk = None if chunk_images is None else int(chunk_images) * source.shifts
    mean, best = softmax_posterior(x.detach().reshape(1, b, -1).to(dtype), a[None], s2[None], source,
                                   dtype=dtype, topk=topk, provenance=return_provenance,
                                   memory_budget=memory_budget, chunk_keys=chunk)
    result = mean.reshape(x.shape).to(x.dtype)
    if return_provenance:
        return result, source.sources(best)[0]
    return result
