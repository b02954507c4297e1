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

Which keys a query may use is its *group*: one bank for all pixels (ELS), one bank per location (LS), one bank
per border class (boundary-broken ELS, App. B.2 and Fig. 9).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import kernels

Tensor = torch.Tensor

PADDINGS = ("zeros", "circular")
GROUPINGS = ("shared", "location", "border")
DEFAULT_MEMORY_BUDGET = 2 * 2**30        # bytes
MIN_NOISE_VARIANCE = 1e-10               # ᾱ = 1 is treated as s² = 1e-10: the posterior is the nearest patch
DEFAULT_TOPK = 8
MAX_QUERY_BLOCK = 8192
REST_FLOOR = 1e-6                        # relative mass below which the float32 remainder is rounding noise
PROGRESS_PAIRS = 2e9                     # show a progress bar above this many query-key pairs (≈ seconds here)


class PatchConfigError(ValueError):
    """An invalid patch size, padding, grouping or bank."""


class PatchMemoryError(MemoryError, ValueError):
    """A configuration whose memory estimate exceeds the budget."""


# ---- patch geometry ------------------------------------------------------------------------------------------

def check_patch_size(patch_size: int) -> int:
    """An odd positive int patch size P, or a clear error."""
    if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0:
        raise PatchConfigError(f"patch_size must be an odd positive integer, got {patch_size!r}")
    return int(patch_size)


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise PatchConfigError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding


def patch_index(height: int, width: int, patch_size: int, padding: str) -> Tensor:
    """[H·W, P·P] indices into a flattened image with one extra zero pixel appended at index H·W.

    Row l lists the pixels of the P×P patch centred at location l = y·W + x in row-major (dy, dx) order:
    wrapped for circular padding, the zero pixel where the patch leaves the image for zero padding. Works for
    any P, also larger than the image.
    """
    r = patch_size // 2
    offs = torch.arange(-r, r + 1)
    ys = torch.arange(height)[:, None] + offs[None, :]          # [H, P]
    xs = torch.arange(width)[:, None] + offs[None, :]           # [W, P]
    if padding == "circular":
        ys, xs = ys % height, xs % width
        idx = ys[:, None, :, None] * width + xs[None, :, None, :]    # [H, W, P, P]
    else:
        inside = ((ys >= 0) & (ys < height))[:, None, :, None] & ((xs >= 0) & (xs < width))[None, :, None, :]
        idx = ys.clamp(0, height - 1)[:, None, :, None] * width + xs.clamp(0, width - 1)[None, :, None, :]
        idx = torch.where(inside, idx, torch.full_like(idx, height * width))
    return idx.reshape(height * width, patch_size * patch_size)


def centre_columns(channels: int, patch_size: int) -> Tensor:
    """Positions of the centre pixel (one per channel) in a flattened patch of D = C·P·P values."""
    r = patch_size // 2
    return torch.arange(channels) * patch_size * patch_size + r * patch_size + r


def gather_patches(images: Tensor, index: Tensor) -> Tensor:
    """Patches [N, L, C·P·P] of images [N, C, H, W] at the rows of a `patch_index` selection index [L, P·P]."""
    n, c = images.shape[:2]
    flat = torch.cat([images.reshape(n, c, -1), images.new_zeros(n, c, 1)], dim=2)   # [N, C, HW+1]
    patches = flat[:, :, index]                                                         # [N, C, L, PP]
    return patches.permute(0, 2, 1, 3).reshape(n, index.shape[0], -1)


def extract_patches(images: Tensor, patch_size: int, padding: str) -> Tensor:
    """All H·W patches [N, H·W, C·P·P] of images [N, C, H, W] (zero-extended or wrapped at the border)."""
    h, w = images.shape[-2:]
    return gather_patches(images, patch_index(h, w, patch_size, padding).to(images.device))


def border_classes(height: int, width: int, patch_size: int) -> Tensor:
    """[H·W, 4] border class of each pixel: distance to the top, left, bottom and right border, capped at
    (P−1)/2 (App. B.2, Fig. 9). Interior pixels share one class; a corner pixel whose patch sees two borders is
    alone in its class; edge pixels share a class with the pixels at the same distance to that edge."""
    r = patch_size // 2
    y = torch.arange(height)[:, None].expand(height, width)
    x = torch.arange(width)[None, :].expand(height, width)
    cls = torch.stack([y.clamp(max=r), x.clamp(max=r), (height - 1 - y).clamp(max=r),
                       (width - 1 - x).clamp(max=r)], dim=-1)
    return cls.reshape(height * width, 4)


@dataclass
class GroupBatch:
    """G groups of equal sizes: group g's queries sit at `query_locs[g]` and may use the bank patches centred
    at `key_locs[g]` (flat locations y·W + x) of every training image."""

    query_locs: Tensor  # [G, Lq]
    key_locs: Tensor    # [G, Lk]

    @property
    def groups(self) -> int:
        return self.query_locs.shape[0]


def group_layout(grouping: str, height: int, width: int, patch_size: int,
                 valid_only: bool = False) -> list[GroupBatch]:
    """Which bank locations each query location may use: 'shared' (ELS: any location; only patches that fit
    inside the image if `valid_only`), 'location' (LS: the same location), 'border' (bbELS: the same border
    class). Groups of equal size are batched into one GroupBatch."""
    hw = height * width
    everywhere = torch.arange(hw)
    if valid_only and grouping != "shared":
        raise PatchConfigError("valid_only applies to the shared (ELS) bank only")
    if grouping == "shared":
        keys = everywhere
        if valid_only:
            r = patch_size // 2
            y, x = everywhere // width, everywhere % width
            keys = everywhere[(y >= r) & (y < height - r) & (x >= r) & (x < width - r)]
            if keys.numel() == 0:
                raise PatchConfigError(f"no {patch_size}×{patch_size} patch fits inside a {height}×{width} image")
        return [GroupBatch(everywhere[None], keys[None])]
    if grouping == "location":
        return [GroupBatch(everywhere[:, None], everywhere[:, None])]
    if grouping == "border":
        _, cls = torch.unique(border_classes(height, width, patch_size), dim=0, return_inverse=True)
        members = [torch.nonzero(cls == c).reshape(-1) for c in range(int(cls.max()) + 1)]
        batches = []
        for size in sorted({len(m) for m in members}):
            locs = torch.stack([m for m in members if len(m) == size])
            batches.append(GroupBatch(locs, locs))
        return batches
    raise PatchConfigError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


# ---- key sources: where the bank's keys, log-weights and values come from -----------------------------------

class KeySource:
    """A bank of keys for G groups, read in chunks; keys are indexed globally within each group.

    chunks(dtype) yields (offset, keys [G, K, D], logw [G, K], values [G, K, V]); gather(index [G, Q, k]) returns
    the exact float64 keys, logw and values of given global indices (−1 = none, logw −inf); sources(index [G, Q])
    returns [G, Q, 3] (training image, y, x) of each key (the provenance).
    """

    groups: int
    dim: int
    value_dim: int
    num_keys: int            # keys per group (padded)
    chunk_keys: int          # keys per group per chunk
    bytes_per_key_extra: float = 0.0   # transient bytes per key while a chunk is being cut

    def set_chunk_keys(self, keys: int) -> None:
        self.chunk_keys = max(1, int(keys))

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def sources(self, index: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class StreamedPatches(KeySource):
    """The patches of a training set cut on the fly, chunk by chunk of images: key j of group g is the patch
    of image j // Lk centred at key_locs[g, j % Lk]."""

    def __init__(self, images: Tensor, log_weights: Tensor, patch_size: int, padding: str,
                 key_locs: Tensor) -> None:
        self.images = images                                         # [N, C, H, W]
        self.log_weights = log_weights                               # [N]
        n, c, h, w = images.shape
        self.width = w
        self.key_locs = key_locs                                     # [G, Lk]
        self.groups, self.locs_per_image = key_locs.shape
        self.index = patch_index(h, w, patch_size, padding)          # [HW, PP]
        self.centre = centre_columns(c, patch_size)
        self.dim = c * patch_size * patch_size
        self.value_dim = c
        self.num_keys = n * self.locs_per_image
        self.chunk_keys = self.num_keys
        self.bytes_per_key_extra = 3.0 * self.dim                    # gathered patches before the permute

    def set_chunk_keys(self, keys: int) -> None:
        images = max(1, int(keys) // self.locs_per_image)
        self.chunk_keys = images * self.locs_per_image

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        per_chunk = max(1, self.chunk_keys // self.locs_per_image)
        flat_locs = self.key_locs.reshape(-1)
        for start in range(0, self.images.shape[0], per_chunk):
            chunk = self.images[start:start + per_chunk].to(dtype)      # [n, C, H, W]
            n = chunk.shape[0]
            patches = gather_patches(chunk, self.index[flat_locs])      # [n, G·Lk, D]
            keys = patches.reshape(n, self.groups, self.locs_per_image, self.dim)
            keys = keys.permute(1, 0, 2, 3).reshape(self.groups, n * self.locs_per_image, self.dim)
            logw = self.log_weights[start:start + n].to(dtype)[None, :, None]
            logw = logw.expand(self.groups, n, self.locs_per_image).reshape(self.groups, -1)
            yield start * self.locs_per_image, keys, logw, keys[..., self.centre]

    def _locate(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(image [G, ...], location [G, ...]) of global key indices [G, ...] (clamped to valid)."""
        idx = index.clamp_min(0)
        image = idx // self.locs_per_image
        slot = idx % self.locs_per_image
        g = torch.arange(self.groups).reshape(-1, *([1] * (idx.ndim - 1))).expand_as(idx)
        return image, self.key_locs[g, slot]

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image, loc = self._locate(index)                                  # [G, Q, k]
        c = self.images.shape[1]
        flat = torch.cat([self.images.reshape(self.images.shape[0], c, -1),
                          self.images.new_zeros(self.images.shape[0], c, 1)], dim=2)   # [N, C, HW+1]
        pix = self.index[loc]                                             # [G, Q, k, PP]
        keys = flat[image[..., None, None], torch.arange(c)[:, None], pix[..., None, :]]  # [G, Q, k, C, PP]
        keys = keys.reshape(*index.shape, self.dim).double()
        logw = self.log_weights[image].double().masked_fill(index < 0, -math.inf)
        return keys, logw, keys[..., self.centre]

    def sources(self, index: Tensor) -> Tensor:
        image, loc = self._locate(index)
        return torch.stack([image, loc // self.width, loc % self.width], dim=-1)


class CachedBank(KeySource):
    """A bank held in memory: keys [G, K, D], logw [G, K], values [G, K, V], sources [G, K, 3]; groups padded
    to equal K with keys of log-weight −inf (always after the real keys)."""

    def __init__(self, keys: Tensor, logw: Tensor, values: Tensor, sources: Tensor) -> None:
        self.keys, self.logw, self.values, self.source_table = keys, logw, values, sources
        self.groups, self.num_keys, self.dim = keys.shape
        self.value_dim = values.shape[-1]
        self.chunk_keys = self.num_keys

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.logw, self.values, self.source_table))

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for start in range(0, self.num_keys, self.chunk_keys):
            stop = start + self.chunk_keys
            yield (start, self.keys[:, start:stop].to(dtype), self.logw[:, start:stop].to(dtype),
                   self.values[:, start:stop].to(dtype))

    def _rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.arange(self.groups).reshape(-1, *([1] * (index.ndim - 1))).expand_as(index)
        return g, index.clamp_min(0)

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g, j = self._rows(index)
        logw = self.logw[g, j].double().masked_fill(index < 0, -math.inf)
        return self.keys[g, j].double(), logw, self.values[g, j].double()

    def sources(self, index: Tensor) -> Tensor:
        g, j = self._rows(index)
        return self.source_table[g, j]


class WholeImages(KeySource):
    """The training images themselves as keys and values (the IS machine, kamb-ganguli eq. 3–4 / 30–31), or,
    with `translates`, all H·W circular translates of each (the ES machine, eq. 5–6): key j is image j // T
    shifted by s = j % T, T = 1 or H·W."""

    def __init__(self, images: Tensor, log_weights: Tensor, translates: bool = False) -> None:
        self.images = images                                             # [N, C, H, W]
        self.log_weights = log_weights                                   # [N]
        n, c, h, w = images.shape
        self.width = w
        self.shifts = h * w if translates else 1
        self.groups, self.dim, self.value_dim = 1, c * h * w, c * h * w
        self.num_keys = n * self.shifts
        self.chunk_keys = self.num_keys
        self.bytes_per_key_extra = 2.0 * self.dim if translates else 0.0
        # shift_index[s, p]: the source pixel of output pixel p = (py, px) under the shift s = (sy, sx)
        ys, xs = torch.arange(h), torch.arange(w)
        src_y = (ys[None, :, None] - ys[:, None, None]) % h                # [sy, py, 1]
        src_x = (xs[None, None, :] - xs[:, None, None]) % w                # [sx, 1, px]
        self.shift_index = (src_y[:, None, :, None] * w + src_x[None, :, None, :]).reshape(h * w, h * w)

    def set_chunk_keys(self, keys: int) -> None:
        self.chunk_keys = max(1, int(keys) // self.shifts) * self.shifts

    def _shifted(self, image_idx: Tensor, shift: Tensor) -> Tensor:
        """Images image_idx [M] under shifts [M] → [M, C·H·W]."""
        n, c = image_idx.shape[0], self.images.shape[1]
        flat = self.images.reshape(self.images.shape[0], c, -1)
        if self.shifts == 1:
            return flat[image_idx].reshape(n, -1)
        return flat[image_idx[:, None, None], torch.arange(c)[:, None], self.shift_index[shift][:, None, :]
                    ].reshape(n, -1)

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        per_chunk = max(1, self.chunk_keys // self.shifts)
        n_img = self.images.shape[0]
        for start in range(0, n_img, per_chunk):
            idx = torch.arange(start, min(start + per_chunk, n_img))
            img = idx.repeat_interleave(self.shifts)
            shift = torch.arange(self.shifts).repeat(idx.shape[0])
            keys = self._shifted(img, shift).to(dtype)[None]                  # [1, n·T, CHW]
            yield start * self.shifts, keys, self.log_weights[img].to(dtype)[None], keys

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = index.clamp_min(0).reshape(-1)
        keys = self._shifted(idx // self.shifts, idx % self.shifts).double().reshape(*index.shape, self.dim)
        logw = self.log_weights[idx // self.shifts].double().reshape(index.shape).masked_fill(index < 0, -math.inf)
        return keys, logw, keys

    def sources(self, index: Tensor) -> Tensor:
        idx = index.clamp_min(0)
        shift = idx % self.shifts
        return torch.stack([idx // self.shifts, shift // self.width, shift % self.width], dim=-1)


def dedup_bank(keys: Tensor, logw: Tensor, values: Tensor, sources: Tensor) -> tuple[Tensor, ...]:
    """Merge identical keys of one group (keys [K, D], logw [K], values [K, V], sources [K, 3]) into one key
    with log-weight logsumexp(logw) — exact, since identical keys have identical logits and the value is a
    function of the key whenever it is a patch centre. The source kept is the first occurrence."""
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    u = uniq.shape[0]
    top = torch.full((u,), -math.inf, dtype=logw.dtype).scatter_reduce(0, inverse, logw, "amax")
    mass = torch.zeros(u, dtype=logw.dtype).index_add_(0, inverse, torch.exp(logw - top[inverse]))
    first = torch.full((u,), keys.shape[0], dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(keys.shape[0]), "amin")
    return uniq, top + torch.log(mass), values[first], sources[first]


def build_cached_bank(source: StreamedPatches, dedup: bool = True) -> CachedBank:
    """Collect a streamed bank into memory, deduplicating each group (groups padded to equal size)."""
    parts: list[tuple[Tensor, ...]] = []
    all_keys, all_logw, all_values = [], [], []
    for _, keys, logw, values in source.chunks(source.images.dtype):
        all_keys.append(keys)
        all_logw.append(logw)
        all_values.append(values)
    keys, logw, values = torch.cat(all_keys, 1), torch.cat(all_logw, 1), torch.cat(all_values, 1)
    idx = torch.arange(keys.shape[1]).expand(source.groups, -1)
    srcs = source.sources(idx)                                                 # [G, K, 3]
    for g in range(source.groups):
        parts.append(dedup_bank(keys[g], logw[g], values[g], srcs[g]) if dedup
                     else (keys[g], logw[g], values[g], srcs[g]))
    k_max = max(p[0].shape[0] for p in parts)

    def pad(t: Tensor, fill: float) -> Tensor:
        extra = t.new_full((k_max - t.shape[0], *t.shape[1:]), fill)
        return torch.cat([t, extra], 0)

    return CachedBank(torch.stack([pad(p[0], 0.0) for p in parts]),
                      torch.stack([pad(p[1], -math.inf) for p in parts]),
                      torch.stack([pad(p[2], 0.0) for p in parts]),
                      torch.stack([pad(p[3], -1) for p in parts]))


# ---- the streaming posterior -------------------------------------------------------------------------------

def noise_coefficients(alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """(a, s²) = (√ᾱ, 1−ᾱ) in float64, with s² floored so that ᾱ = 1 means 'nearest patch'."""
    ab = alpha_bar.to(torch.float64)
    return ab.sqrt(), (1 - ab).clamp_min(MIN_NOISE_VARIANCE)


def augment_queries(queries: Tensor, a: Tensor, s2: Tensor, dtype: torch.dtype) -> Tensor:
    """[q·a/s², −a²/(2s²)]: [G, Q, D+1] from queries [G, Q, D] and per-query a, s² [G, Q]."""
    scale = (a / s2).to(dtype)[..., None]
    bias = (-(a * a) / (2 * s2)).to(dtype)[..., None]
    return torch.cat([queries.to(dtype) * scale, bias], dim=-1)


def augment_keys(keys: Tensor) -> Tensor:
    """[k, ‖k‖²]: [G, K, D+1]."""
    return torch.cat([keys, (keys * keys).sum(-1, keepdim=True)], dim=-1)


@dataclass
class Budget:
    """Block sizes that keep one call within `memory_budget` bytes."""

    query_block: int
    chunk_keys: int
    estimate: int


def plan_memory(groups: int, queries: int, dim: int, value_dim: int, num_keys: int, itemsize: int, topk: int,
                memory_budget: float, key_extra_bytes: float = 0.0, chunk_keys: int | None = None) -> Budget:
    """Choose a query block and a key chunk so that the working set fits in `memory_budget`; raise
    PatchMemoryError (with the estimate) when even the smallest blocks do not fit."""
    track = 2 * itemsize + 16 if topk else 0
    pair = 4 * itemsize + track                                # logits, exp, temporaries, top-k candidates
    per_key = (2 * (dim + 1) + value_dim + 1) * itemsize + key_extra_bytes * itemsize
    per_query = (2 * (dim + 1) + value_dim + 2) * itemsize + topk * (itemsize + 8)
    fixed = groups * queries * per_query
    fix_bytes = 3 * topk * (dim + value_dim) * 8               # exact top-k recomputation per query (float64)

    def estimate(qb: int, kc: int) -> int:
        return int(fixed + groups * (qb * kc * pair + kc * per_key + qb * fix_bytes))

    qb = min(queries, MAX_QUERY_BLOCK)
    if chunk_keys is not None:
        kc = max(1, min(int(chunk_keys), num_keys))
        while qb > 1 and estimate(qb, kc) > memory_budget:
            qb = max(1, qb // 2)
        if estimate(qb, kc) > memory_budget:
            raise PatchMemoryError(
                f"chunk of {kc} keys per group needs about {estimate(qb, kc) / 2**20:.0f} MiB, over the "
                f"memory budget of {memory_budget / 2**20:.0f} MiB; use a smaller chunk_images")
        return Budget(qb, kc, estimate(qb, kc))
    while True:
        spare = memory_budget - fixed - groups * qb * fix_bytes
        kc = int(spare // (groups * (qb * pair + per_key))) if spare > 0 else 0
        if kc >= min(num_keys, 256) or (kc >= 1 and qb == 1):
            kc = min(kc, num_keys)
            return Budget(qb, kc, estimate(qb, kc))
        if qb == 1:
            raise PatchMemoryError(
                f"needs about {estimate(1, 1) / 2**20:.0f} MiB even one query and one key at a time "
                f"({groups} groups × {queries} queries of dimension {dim}), over the memory budget of "
                f"{memory_budget / 2**20:.0f} MiB; raise memory_budget or denoise fewer samples at once")
        qb = max(1, qb // 2)


def softmax_posterior(queries: Tensor, a: Tensor, s2: Tensor, source: KeySource, *,
                      dtype: torch.dtype = torch.float32, topk: int = DEFAULT_TOPK,
                      provenance: bool = False, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                      chunk_keys: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Posterior mean Σ_j softmax_j(ℓ_ij)·v_j over a key source, streamed (kamb-ganguli eq. 8, 10, 40).

    queries: [G, Q, D] raw query patches; a, s2: [G, Q] (float64) noise coefficients of each query.
    Returns (mean [G, Q, V] in `dtype`, best [G, Q] global index of the arg-max key or None).
    In float32 the top-`topk` keys of each query are recomputed exactly (float64, distance form).
    """
    g, q, d = queries.shape
    exact_fix = dtype != torch.float64 and topk > 0
    track = topk if exact_fix else (1 if provenance else 0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_memory(g, q, d, source.value_dim, source.num_keys, itemsize, track, memory_budget,
                       source.bytes_per_key_extra, chunk_keys)
    source.set_chunk_keys(plan.chunk_keys)
    q_aug = augment_queries(queries, a, s2, dtype)                               # [G, Q, D+1]
    blocks = [(start, min(start + plan.query_block, q)) for start in range(0, q, plan.query_block)]
    states = [kernels.init_state((g, stop - start), source.value_dim, dtype, queries.device, topk=track)
              for start, stop in blocks]
    n_chunks = math.ceil(source.num_keys / source.chunk_keys)
    show = g * q * source.num_keys > PROGRESS_PAIRS
    for offset, keys, logw, values in tqdm(source.chunks(dtype), total=n_chunks, disable=not show,
                                           desc="patch posterior", leave=False):
        k_aug = augment_keys(keys)                                                 # [G, K, D+1]
        for i, (start, stop) in enumerate(blocks):
            states[i] = kernels.accumulate(states[i], q_aug[:, start:stop], k_aug, logw, values, 1.0,
                                           key_offset=offset)
    means, bests = [], []
    for (start, stop), state in zip(blocks, states, strict=True):
        if exact_fix:
            mean, best = exact_topk_correction(state, queries[:, start:stop], a[:, start:stop],
                                               s2[:, start:stop], source, memory_budget)
            means.append(mean.to(dtype))
            bests.append(best)
        else:
            means.append(kernels.finalize(state))
            bests.append(state.topk_index[..., 0] if provenance else None)
    best = torch.cat(bests, 1) if provenance else None
    return torch.cat(means, 1), best


def exact_topk_correction(state: kernels.SoftmaxState, queries: Tensor, a: Tensor, s2: Tensor,
                          source: KeySource, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                          ) -> tuple[Tensor, Tensor]:
    """Replace the streamed (float32) contributions of each query's tracked top keys by exact ones.

    The streamed logit ℓ̃ = (a/s²)q·k − (a²/2s²)‖k‖² + logw carries an absolute error ~ eps·(a/s²)|q·k|, large
    at low noise; the exact logit in the same frame is −‖q − a·k‖²/(2s²) + ‖q‖²/(2s²) + logw in float64. The
    rest of the bank keeps its streamed weights, whose errors only matter when it carries non-negligible mass.
    queries [G, Q, D]; a, s2 [G, Q]. Returns (mean [G, Q, V] float64, best key [G, Q]).
    """
    g, q, d = queries.shape
    k = state.topk_index.shape[-1]
    step = max(1, int(memory_budget // max(1, 4 * g * k * (d + source.value_dim) * 8)))
    means, bests = [], []
    for start in range(0, q, step):
        sl = slice(start, start + step)
        index = state.topk_index[:, sl]                                             # [G, q', k]
        keys, logw, values = source.gather(index)                                   # [G, q', k, D] ...
        qd = queries[:, sl].double()
        ad, sd = a[:, sl][..., None], s2[:, sl][..., None]
        dist = ((qd[:, :, None, :] - ad[..., None] * keys) ** 2).sum(-1)            # [G, q', k]
        exact = (-dist + (qd * qd).sum(-1, keepdim=True)) / (2 * sd) + logw
        exact = exact.masked_fill(index < 0, -math.inf)
        m = state.m[:, sl].double()[..., None]                                      # [G, q', 1]
        approx_w = torch.exp(state.topk_logit[:, sl].double() - m).masked_fill(index < 0, 0.0)
        total = state.l[:, sl].double()                                             # [G, q']
        rest_l = total - approx_w.sum(-1)
        # a remainder within float32 rounding of the total is no mass at all: drop it (error < 2·REST_FLOOR)
        kept = rest_l > REST_FLOOR * total
        rest_l = torch.where(kept, rest_l, torch.zeros_like(rest_l))
        rest_acc = state.acc[:, sl].double() - (approx_w[..., None] * values).sum(-2)
        rest_acc = torch.where(kept[..., None], rest_acc, torch.zeros_like(rest_acc))
        # the exact top logits may sit far from the streamed max m (low noise): renormalize in log space
        log_rest = m + torch.log(rest_l)[..., None]                                 # −inf when dropped
        m_new = torch.maximum(log_rest, exact.amax(-1, keepdim=True))               # [G, q', 1]
        shrink = torch.where(kept, torch.exp(m - m_new)[..., 0], torch.zeros_like(rest_l))
        w = torch.exp(exact - m_new)                                                # [G, q', k]
        l_new = rest_l * shrink + w.sum(-1)
        acc_new = rest_acc * shrink[..., None] + (w[..., None] * values).sum(-2)
        means.append(acc_new / l_new[..., None])
        bests.append(torch.gather(index, -1, exact.argmax(-1, keepdim=True))[..., 0])
    return torch.cat(means, 1), torch.cat(bests, 1)


# ---- the patch engine: images in, posterior-mean images out ------------------------------------------------

class PatchPosterior:
    """The patch-posterior engine of one training set.

    images: [N, C, H, W]; log_weights: [N] per-image log-weight (default 0); grouping: 'shared' (ELS),
    'location' (LS) or 'border' (bbELS); padding: 'zeros' or 'circular' (applied to queries and bank alike,
    as in a padded CNN); valid_only: bank of patches that fit inside the image only (the released code's
    ELS bank; off by default — the theory, App. B.1, uses all H·W patches).
    cache: 'auto' (build, deduplicate and keep the bank per patch size when it fits a quarter of the memory
    budget), True, or False (always stream). chunk_images: training images per streamed chunk (default: from
    the memory budget). dtype: float32 (fast, exact top-k fix) or float64 (reference).
    """

    def __init__(self, images: Tensor, *, grouping: str = "shared", padding: str = "circular",
                 log_weights: Tensor | None = None, valid_only: bool = False,
                 dtype: torch.dtype = torch.float32, chunk_images: int | None = None,
                 memory_budget: float = DEFAULT_MEMORY_BUDGET, cache: bool | str = "auto",
                 topk: int = DEFAULT_TOPK) -> None:
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
        self._layouts: dict[int, list[GroupBatch]] = {}
        self._banks: dict[tuple[int, int], KeySource] = {}

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
        raw_bytes = stream.groups * stream.num_keys * (stream.dim + stream.value_dim + 8) * 4
        use_cache = self.cache is True or (self.cache == "auto" and 8 * raw_bytes <= self.memory_budget)
        if self.cache is True and 4 * raw_bytes > self.memory_budget:
            raise PatchMemoryError(f"caching the {patch_size}×{patch_size} bank needs about "
                                   f"{4 * raw_bytes / 2**20:.0f} MiB, over the memory budget of "
                                   f"{self.memory_budget / 2**20:.0f} MiB; use cache='auto' or False")
        source: KeySource = build_cached_bank(stream) if use_cache else stream
        self._banks[key] = source
        return source

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

    def _denoise(self, x: Tensor, ab: Tensor, patch_size: int,
                 return_provenance: bool) -> Tensor | tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        a, s2 = noise_coefficients(ab)
        queries = extract_patches(x.detach().to(self.dtype), patch_size, self.padding)   # [B, HW, D]
        out = torch.empty(b, h * w, c, dtype=self.dtype)
        prov = torch.full((b, h * w, 3), -1, dtype=torch.int64)
        for i, gb in enumerate(self.layout(patch_size)):
            source = self.bank(patch_size, i)
            lq = gb.query_locs.shape[1]
            q = queries[:, gb.query_locs].permute(1, 0, 2, 3).reshape(gb.groups, b * lq, -1)  # [G, B·Lq, D]
            a_q = a[:, None].expand(b, lq).reshape(1, -1).expand(gb.groups, -1)
            s2_q = s2[:, None].expand(b, lq).reshape(1, -1).expand(gb.groups, -1)
            chunk = None if self.chunk_images is None or isinstance(source, CachedBank) \
                else self.chunk_images * gb.key_locs.shape[1]
            mean, best = softmax_posterior(q, a_q, s2_q, source, dtype=self.dtype, topk=self.topk,
                                           provenance=return_provenance, memory_budget=self.memory_budget,
                                           chunk_keys=chunk)
            locs = gb.query_locs.T                                                   # [Lq, G]
            out[:, locs] = mean.reshape(gb.groups, b, lq, c).permute(1, 2, 0, 3)
            if return_provenance:
                prov[:, locs] = source.sources(best).reshape(gb.groups, b, lq, 3).permute(1, 2, 0, 3)
        result = out.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)
        if return_provenance:
            return result, prov.reshape(b, h, w, 3)
        return result


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
