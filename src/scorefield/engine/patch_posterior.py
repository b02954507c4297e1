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

Where the work happens: `gemm_route` (the attention-style route, any device, and the differentiable route),
`box_route` (box sums of the shared circular bank on the CPU), `flat` (the prior-mean shortcut). A call whose
input requires grad (with grad mode on) is differentiable in x: every fold then runs the float64 pure-torch
reference, so `torch.autograd.grad` and Jacobian-vector products see the exact posterior mean.

Devices: the engine lives where its training images live (`PatchPosterior(images.to(device))` or
`.to(device)`); a call's output is on the input's device, and a call on another device moves the engine there
first (once; the banks are rebuilt there).
"""
from __future__ import annotations

import torch

from . import box, pruning
from .banks import KeySource, StreamedPatches, build_cached_bank, cluster_bank, held_bytes
from .box_route import (
    BOX_MAX_LOGIT_ERROR,
    BOX_MIN_PATCH,
    BOX_SAMPLE_IMAGES,
    BOX_UNIQUE_FRACTION,
    denoise_box,
    unique_fraction,
    uses_box,
)
from .errors import PatchConfigError, PatchMemoryError
from .flat import FLAT_LOGIT_SPREAD, bank_prior_mean, circular_prior_mean
from .gemm_route import denoise_gemm
from .geometry import GROUPINGS, GroupBatch, check_padding, check_patch_size, group_layout
from .image_posterior import image_posterior
from .posterior import DEFAULT_MEMORY_BUDGET, DEFAULT_TOPK

__all__ = ["BOX_MAX_LOGIT_ERROR", "BOX_MIN_PATCH", "BOX_SAMPLE_IMAGES", "BOX_UNIQUE_FRACTION", "CROSS_TERMS",
           "FLAT_LOGIT_SPREAD", "PRUNE_MIN_KEYS", "PatchPosterior", "image_posterior"]

Tensor = torch.Tensor

PRUNE_MIN_KEYS = 8192                    # prune='auto' clusters banks of at least this many keys
CROSS_TERMS = ("auto", "box", "gemm")


def check_patch_fits(patch_size: int, image_shape: tuple[int, ...]) -> None:
    """Refuse a patch beyond 2·max(H, W) − 1: from that size on every pixel's patch already covers the whole
    image from anywhere (LS becomes IS, kamb-ganguli), so a larger one only costs more (P² per pair)."""
    h, w = image_shape[-2:]
    limit = 2 * max(h, w) - 1
    if patch_size > limit:
        raise PatchConfigError(f"patch_size {patch_size} exceeds 2·max(H, W) − 1 = {limit} for {h}×{w} images, "
                               f"where every patch already covers the whole image; use at most {limit}")


def _check_options(images: Tensor, grouping: str, dtype: torch.dtype, chunk_images: int | None,
                   cache: bool | str, prune: bool | str, clusters: int | None, cross_term: str) -> None:
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
    if prune not in ("auto", True, False):
        raise PatchConfigError(f"prune must be 'auto', True or False, got {prune!r}")
    if clusters is not None and (int(clusters) != clusters or clusters < 1):
        raise PatchConfigError(f"clusters must be a positive integer, got {clusters!r}")
    if cross_term not in CROSS_TERMS:
        raise PatchConfigError(f"cross_term must be one of {CROSS_TERMS}, got {cross_term!r}")


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
    `history` one such dict per call (each also names the route, 'cross_term', the implementation that folded,
    'fold': compiled / reference / autograd, and the 'device'). stream_dedup: merge the identical keys of each
    streamed chunk into one key of log-weight logsumexp(logw) before folding it (exact; provenance is the first
    occurrence in the chunk; pairs evaluated count the merged keys).
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
                 box_tolerance: float = box.DEFAULT_TOLERANCE) -> None:
        _check_options(images, grouping, dtype, chunk_images, cache, prune, clusters, cross_term)
        self.images = images.detach().to(torch.float32).contiguous()                  # [N, C, H, W]
        n = self.images.shape[0]
        self.log_weights = (torch.zeros(n, dtype=torch.float64, device=self.images.device) if log_weights is None
                            else torch.as_tensor(log_weights, dtype=torch.float64).reshape(n).to(self.device))
        self.grouping, self.padding = grouping, check_padding(padding)
        self.valid_only, self.dtype, self.topk = bool(valid_only), dtype, int(topk)
        self.chunk_images, self.memory_budget, self.cache = chunk_images, float(memory_budget), cache
        self.prune, self.prune_tolerance = prune, pruning.check_tolerance(prune_tolerance)
        self.clusters, self.stream_dedup, self.cross_term = clusters, bool(stream_dedup), cross_term
        self.box_tolerance = float(box_tolerance)
        box.threshold_for(2, self.box_tolerance)   # validates the tolerance
        self.max_pixel = float(self.images.abs().max())
        self.last_stats: dict = {}
        self.history: list[dict] = []
        self._layouts: dict[int, list[GroupBatch]] = {}
        self.unique_fractions: dict[int, float] = {}
        self._constant_value: float | None = None
        self._reset_device_caches()

    def _reset_device_caches(self) -> None:
        self._banks: dict[tuple[int, int], KeySource] = {}
        self._prior_means: dict[tuple[int, int], Tensor] = {}
        self._constant_keys: dict[int, box.ConstantKeys | None] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> PatchPosterior:
        """Move the training images (and so every bank built from them) to `device`; returns self."""
        device = torch.device(device)
        if device != self.device:
            self.images = self.images.to(device)
            self.log_weights = self.log_weights.to(device)
            self._reset_device_caches()
        return self

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
        while len(self._banks) > 1 and sum(held_bytes(b) for b in self._banks.values()) > self.memory_budget / 4:
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
        check_patch_fits(patch_size, self.image_shape)
        if tuple(x.shape[1:]) != self.image_shape:
            raise PatchConfigError(f"x has image shape {tuple(x.shape[1:])}, the bank {self.image_shape}")
        self.to(x.device)
        b = x.shape[0]
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1).expand(b)
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
        itemsize = torch.finfo(self.dtype).bits // 8
        per_sample = h * w * (3 * (c * patch_size**2 + 1) + c + 2 + 2 * self.topk) * itemsize
        return max(1, int(self.memory_budget // (2 * per_sample)))

    def prior_mean(self, patch_size: int, batch_index: int) -> Tensor:
        """Σ_k w_k v_k / Σ_k w_k of a bank ([G, V], cached): the posterior mean when logits are flat."""
        key = (patch_size, batch_index)
        if key not in self._prior_means:
            if self.grouping == "shared" and self.padding == "circular" and not self.valid_only:
                self._prior_means[key] = circular_prior_mean(self.images, self.log_weights, self.dtype)
            else:
                self._prior_means[key] = bank_prior_mean(self.bank(patch_size, batch_index), self.dtype)
        return self._prior_means[key]

    def constant_keys(self, patch_size: int) -> box.ConstantKeys | None:
        """The bank's constant patches, merged once per patch size (the box route folds them in closed form)."""
        if patch_size not in self._constant_keys:
            if self._constant_value is None:   # (host memory: only the compiled CPU route uses them)
                self._constant_value = box.most_frequent_value(self.images)
            self._constant_keys[patch_size] = box.constant_keys(
                self.images, self.log_weights.to(torch.float64), patch_size, self._constant_value)
        return self._constant_keys[patch_size]

    def unique_fraction(self, patch_size: int) -> float:
        """Fraction of distinct patches in a sample of the bank (see `box_route.unique_fraction`)."""
        return unique_fraction(self, patch_size)

    def _denoise(self, x: Tensor, ab: Tensor, patch_size: int,
                 return_provenance: bool) -> Tensor | tuple[Tensor, Tensor]:
        differentiable = torch.is_grad_enabled() and x.requires_grad and not return_provenance
        if uses_box(self, x, ab, patch_size, differentiable):
            result, prov, stats = denoise_box(self, x, ab, patch_size, return_provenance)
        else:
            result, prov, stats = denoise_gemm(self, x, ab, patch_size, return_provenance, differentiable)
        self.last_stats = stats
        self.history.append(stats)
        return (result, prov) if return_provenance else result
