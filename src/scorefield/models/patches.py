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
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import fastkernel, kernels, pruning

Tensor = torch.Tensor

PADDINGS = ("zeros", "circular")
GROUPINGS = ("shared", "location", "border")
DEFAULT_MEMORY_BUDGET = 2 * 2**30        # bytes
MIN_NOISE_VARIANCE = 1e-10               # ᾱ = 1 is treated as s² = 1e-10: the posterior is the nearest patch
DEFAULT_TOPK = 8
MAX_QUERY_BLOCK = 8192
REST_FLOOR = 1e-6                        # relative mass below which the float32 remainder is rounding noise
ASSIGN_CHUNK_KEYS = 2**16                # keys cut at once while clustering a streamed bank
PIECE_KEYS = 2**15                       # keys of one cluster folded at once by the pruned posterior
FULL_PASS_FRACTION = 0.6                 # above this fraction of pairs to fold, one plain pass is cheaper
FULL_PASS_KEYS = 2**16                   # keys per chunk of that plain pass
SMALL_FOLD_PAIRS = 2**21                 # folds of fewer (query, key) pairs run on one thread
PRUNE_MIN_KEYS = 8192                    # prune='auto' clusters banks of at least this many keys
FLAT_LOGIT_SPREAD = 1e-9                 # below this logit spread the posterior is the bank's prior mean
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

    def augmented_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """As `chunks`, with keys augmented to [k, ‖k‖²]: [G, K, D+1] (what the kernel folds)."""
        for offset, keys, logw, values in self.chunks(dtype):
            yield offset, augment_keys(keys), logw, values

    def take(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
        """Keys [M, D], logw [M], values [M, V] (float32) of single-group global indices [M]."""
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

    def take(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image, loc = self._locate(index[None])                            # [1, M]
        c = self.images.shape[1]
        flat = torch.cat([self.images.reshape(self.images.shape[0], c, -1),
                          self.images.new_zeros(self.images.shape[0], c, 1)], dim=2)   # [N, C, HW+1]
        keys = flat[image[0][:, None, None], torch.arange(c)[:, None], self.index[loc[0]][:, None, :]]
        keys = keys.reshape(index.shape[0], self.dim)                     # [M, D]
        return keys, self.log_weights[image[0]].to(torch.float32), keys[:, self.centre]


class CachedBank(KeySource):
    """A bank held in memory: keys [G, K, D], logw [G, K], values [G, K, V], sources [G, K, 3]; groups padded
    to equal K with keys of log-weight −inf (always after the real keys)."""

    def __init__(self, keys: Tensor, logw: Tensor, values: Tensor, sources: Tensor) -> None:
        # the augmented keys are what every call folds: kept once, the raw keys are a view of them
        self.keys_aug = augment_keys(keys.to(torch.float32))                  # [G, K, D+1]
        self.keys = self.keys_aug[..., :-1]
        self.logw, self.values, self.source_table = logw, values, sources
        self.groups, self.num_keys, self.dim = keys.shape
        self.value_dim = values.shape[-1]
        self.chunk_keys = self.num_keys

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys_aug, self.logw, self.values,
                                                           self.source_table))

    def augmented_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for start in range(0, self.num_keys, self.chunk_keys):
            stop = start + self.chunk_keys
            yield (start, _augmented(self.keys_aug[:, start:stop], dtype), self.logw[:, start:stop].to(dtype),
                   self.values[:, start:stop].to(dtype))

    def take(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.keys[0, index], self.logw[0, index].to(torch.float32), self.values[0, index]

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


def _held_bytes(source: KeySource) -> int:
    """Bytes a key source keeps in memory between calls (its cached keys, cluster order and centroids)."""
    held = [getattr(source, name, None) for name in ("keys_aug", "logw", "values", "source_table", "rep_keys")]
    extra = 0
    if isinstance(source, ClusteredBank):
        held += [source.index.order, source.index.centroids]
        extra = _held_bytes(source.base) if isinstance(source.base, CachedBank) else 0
    return extra + sum(t.numel() * t.element_size() for t in held if isinstance(t, Tensor))


def _augmented(keys_aug: Tensor, dtype: torch.dtype) -> Tensor:
    """Held float32 augmented keys in `dtype`; the ‖k‖² column is recomputed when more precision is asked."""
    if dtype == keys_aug.dtype:
        return keys_aug
    return augment_keys(keys_aug[..., :-1].to(dtype))


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


def row_hashes(keys: Tensor, block: int = 16384) -> Tensor:
    """A 64-bit hash [K] of the bit pattern of each row of keys [K, D] (float32): equal rows hash equally."""
    bits = keys.contiguous().view(torch.int32)
    gen = torch.Generator().manual_seed(12345)
    mult = torch.randint(1, 2**62, (keys.shape[1],), generator=gen, dtype=torch.int64) | 1   # odd multipliers
    out = torch.empty(keys.shape[0], dtype=torch.int64)
    for start in range(0, keys.shape[0], block):          # int64 products wrap: a deterministic hash
        out[start:start + block] = (bits[start:start + block].long() * mult).sum(-1)
    return out


def unique_rows(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(first occurrence [U], inverse [K]) of the distinct rows of keys [K, D]: sort-free hashing, then a
    check that every row equals its representative (exact: a hash collision falls back to a row sort)."""
    _, inverse = torch.unique(row_hashes(keys), return_inverse=True)
    u = int(inverse.max()) + 1 if inverse.numel() else 0
    first = torch.full((u,), keys.shape[0], dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(keys.shape[0]), "amin")
    if not torch.equal(keys[first][inverse], keys):
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        u = int(inverse.max()) + 1
        first = torch.full((u,), keys.shape[0], dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(keys.shape[0]), "amin")
    return first, inverse


def dedup_bank(keys: Tensor, logw: Tensor, values: Tensor, sources: Tensor) -> tuple[Tensor, ...]:
    """Merge identical keys of one group (keys [K, D], logw [K], values [K, V], sources [K, 3]) into one key
    with log-weight logsumexp(logw) — exact, since identical keys have identical logits and the value is a
    function of the key whenever it is a patch centre. The source kept is the first occurrence."""
    first, inverse = unique_rows(keys)
    u = first.shape[0]
    top = torch.full((u,), -math.inf, dtype=logw.dtype).scatter_reduce(0, inverse, logw, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros(u, dtype=logw.dtype).index_add_(0, inverse, torch.exp(logw - safe[inverse]))
    return keys[first], safe + torch.log(mass), values[first], sources[first]


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

    bank = CachedBank(torch.stack([pad(p[0], 0.0) for p in parts]),
                      torch.stack([pad(p[1], -math.inf) for p in parts]),
                      torch.stack([pad(p[2], 0.0) for p in parts]),
                      torch.stack([pad(p[3], -1) for p in parts]))
    bank.raw_keys = source.num_keys
    return bank


class ClusteredBank(KeySource):
    """A single-group bank sorted by cluster, with a centroid, radius and log-mass per cluster
    (`pruning.ClusterIndex`) so that whole clusters can be skipped with a certified bound.

    Keys are held sorted and augmented when the base bank is cached; for a streamed base only the cluster
    order is held ([K] indices) and each cluster's patches are cut from the images when it is needed, so
    memory stays bounded whatever the training set size. Global key indices refer to the sorted order."""

    def __init__(self, base: KeySource, index: pruning.ClusterIndex) -> None:
        if base.groups != 1:
            raise PatchConfigError("a clustered bank holds one group of keys")
        self.base, self.index = base, index
        self.groups, self.dim, self.value_dim = 1, base.dim, base.value_dim
        self.num_keys = int(index.order.shape[0])
        self.chunk_keys = self.num_keys
        self.raw_keys = getattr(base, "raw_keys", base.num_keys)
        self.held = isinstance(base, CachedBank)
        rep_keys, rep_logw, _ = base.take(index.order[index.representative])
        self.rep_keys, self.rep_logw = rep_keys.double(), rep_logw.double()         # [C, D], [C]
        if self.held:
            keys, logw, values = base.take(index.order)
            self.keys_aug = augment_keys(keys)[None]                         # [1, K, D+1] sorted
            self.logw, self.values = logw[None], values[None]                # [1, K], [1, K, V]

    def keys_between(self, start: int, stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Sorted keys start…stop−1: (augmented keys [1, k, D+1], logw [1, k], values [1, k, V])."""
        if self.held:
            return (_augmented(self.keys_aug[:, start:stop], dtype), self.logw[:, start:stop].to(dtype),
                    self.values[:, start:stop].to(dtype))
        keys, logw, values = self.base.take(self.index.order[start:stop])
        return augment_keys(keys.to(dtype))[None], logw.to(dtype)[None], values.to(dtype)[None]

    def augmented_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for start in range(0, self.num_keys, self.chunk_keys):
            stop = min(start + self.chunk_keys, self.num_keys)
            yield (start, *self.keys_between(start, stop, dtype))

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for start, k_aug, logw, values in self.augmented_chunks(dtype):
            yield start, k_aug[..., :-1], logw, values

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, logw, values = self.base.gather(self.index.order[index.clamp_min(0)])
        return keys, logw.masked_fill(index < 0, -math.inf), values

    def sources(self, index: Tensor) -> Tensor:
        return self.base.sources(self.index.order[index.clamp_min(0)])

    def take(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.base.take(self.index.order[index])


def cluster_bank(base: KeySource, clusters: int | None = None, seed: int = 0) -> ClusteredBank:
    """Cluster a single-group bank (cached or streamed) once: k-means centroids from a sample of keys, then
    one pass assigning every key to its nearest centroid and recording its exact distance (the radius)."""
    k = base.num_keys
    clusters = pruning.default_cluster_count(k, base.dim) if clusters is None else int(clusters)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(k, generator=gen)[:min(k, pruning.SAMPLE_PER_CLUSTER * clusters)]
    centroids = pruning.kmeans_centroids(base.take(sample.sort().values)[0].to(torch.float32), clusters, gen)
    labels, dists, logws = [], [], []
    if isinstance(base, CachedBank):
        parts = [(base.keys[0], base.logw[0])]
    else:
        base.set_chunk_keys(min(k, ASSIGN_CHUNK_KEYS))
        parts = ((keys[0], logw[0]) for _, keys, logw, _ in base.chunks(torch.float32))
    for keys, logw in parts:
        label, dist = pruning.nearest_centroid(keys, centroids)
        labels.append(label)
        dists.append(dist)
        logws.append(logw)
    index = pruning.build_cluster_index(torch.cat(labels), torch.cat(dists), torch.cat(logws), centroids)
    return ClusteredBank(base, index)


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
                memory_budget: float, key_extra_bytes: float = 0.0, chunk_keys: int | None = None,
                fused: bool = False) -> Budget:
    """Choose a query block and a key chunk so that the working set fits in `memory_budget`; raise
    PatchMemoryError (with the estimate) when even the smallest blocks do not fit. `fused`: the compiled
    kernel folds each score tile in cache and allocates nothing per (query, key) pair."""
    track = 2 * itemsize + 16 if topk else 0
    pair = 0 if fused else 4 * itemsize + track                # logits, exp, temporaries, top-k candidates
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
        if fused:   # nothing grows with the pairs: a quarter of the budget for a chunk is plenty
            kc = min(kc, int(memory_budget // (4 * groups * per_key)))
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
    fused = (dtype == torch.float32 and queries.device.type == "cpu" and source.value_dim <= fastkernel.MAX_VALUE_DIM
             and fastkernel.available())
    plan = plan_memory(g, q, d, source.value_dim, source.num_keys, itemsize, track, memory_budget,
                       source.bytes_per_key_extra, chunk_keys, fused=fused)
    source.set_chunk_keys(plan.chunk_keys)
    q_aug = augment_queries(queries, a, s2, dtype)                               # [G, Q, D+1]
    blocks = [(start, min(start + plan.query_block, q)) for start in range(0, q, plan.query_block)]
    states = [kernels.init_state((g, stop - start), source.value_dim, dtype, queries.device, topk=track)
              for start, stop in blocks]
    n_chunks = math.ceil(source.num_keys / source.chunk_keys)
    show = g * q * source.num_keys > PROGRESS_PAIRS
    for offset, k_aug, logw, values in tqdm(source.augmented_chunks(dtype), total=n_chunks,
                                            disable=not show, desc="patch posterior", leave=False):
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


def _take_state(state: kernels.SoftmaxState, rows: Tensor) -> kernels.SoftmaxState:
    """The state of queries `rows` [q'] of a single-group state [1, Q, ...] (index_select: advanced indexing
    is far slower on a busy machine)."""
    pick = (lambda t: None if t is None else t.index_select(1, rows))  # noqa: E731
    return kernels.SoftmaxState(pick(state.m), pick(state.l), pick(state.acc), pick(state.topk_logit),
                                pick(state.topk_index))


def _put_state(state: kernels.SoftmaxState, rows: Tensor, part: kernels.SoftmaxState) -> None:
    state.m.index_copy_(1, rows, part.m)
    state.l.index_copy_(1, rows, part.l)
    state.acc.index_copy_(1, rows, part.acc)
    if state.topk_logit is not None:
        state.topk_logit.index_copy_(1, rows, part.topk_logit)
        state.topk_index.index_copy_(1, rows, part.topk_index)


def pruned_posterior(queries: Tensor, a: Tensor, s2: Tensor, bank: ClusteredBank, *,
                     dtype: torch.dtype = torch.float32, topk: int = DEFAULT_TOPK, provenance: bool = False,
                     tolerance: float = pruning.DEFAULT_TOLERANCE,
                     memory_budget: float = DEFAULT_MEMORY_BUDGET) -> tuple[Tensor, Tensor | None, dict]:
    """`softmax_posterior` over a clustered bank, skipping per query the clusters whose certified upper bound
    on mass is negligible: the skipped mass is at most `tolerance` of the total (`pruning` module docstring).

    Per block of queries: bound every cluster's mass from above and log Z from below (`pruning.cluster_bounds`),
    then fold, per query, every cluster except those whose summed upper bounds stay within tolerance·Z
    (`pruning.select_clusters`); when that would still fold more than FULL_PASS_FRACTION of the pairs, one
    plain pass over the whole bank is cheaper and nothing is skipped.
    queries: [1, Q, D]; a, s2: [1, Q] (float64). Returns (mean [1, Q, V], best [1, Q] or None, stats), stats =
    {pairs_evaluated, pairs_total (Q × the bank before deduplication), neglected_bound (max over queries of
    the bound on the neglected fraction of the mass)}.
    """
    _, q, d = queries.shape
    # a block holds a few [q', C] float64 matrices and its softmax state
    block = max(1, min(MAX_QUERY_BLOCK * 4, int(memory_budget // (16 * 8 * max(1, bank.index.clusters)
                                                                  + 16 * 8 * (d + 1)))))
    means, bests, evaluated, neglected = [], [], 0, 0.0
    threads = torch.get_num_threads()
    try:   # the many small operations are over before a second thread is scheduled on a shared machine
        torch.set_num_threads(1)
        for start in range(0, q, block):
            sl = slice(start, start + block)
            mean, best, pairs, bound = _pruned_block(queries[:, sl], a[:, sl], s2[:, sl], bank, dtype, topk,
                                                     provenance, tolerance, memory_budget, threads)
            means.append(mean)
            bests.append(best)
            evaluated += pairs
            neglected = max(neglected, bound)
    finally:
        torch.set_num_threads(threads)
    stats = {"pairs_evaluated": evaluated, "pairs_total": q * bank.raw_keys, "neglected_bound": neglected}
    return torch.cat(means, 1), torch.cat(bests, 1) if provenance else None, stats


def _pruned_block(queries: Tensor, a: Tensor, s2: Tensor, bank: ClusteredBank, dtype: torch.dtype, topk: int,
                  provenance: bool, tolerance: float, memory_budget: float, threads: int
                  ) -> tuple[Tensor, Tensor | None, int, float]:
    """One block of `pruned_posterior`: (mean [1, q, V], best [1, q] or None, pairs evaluated, bound)."""
    q = queries.shape[1]
    exact_fix = dtype != torch.float64 and topk > 0
    track = topk if exact_fix else (1 if provenance else 0)
    torch.set_num_threads(threads)                                                 # two GEMMs: [q, C, D]
    upper, lower = pruning.cluster_bounds(queries[0], a[0], s2[0], bank.index, bank.rep_keys, bank.rep_logw)
    torch.set_num_threads(1)
    mask, bound = pruning.select_clusters(upper, lower, tolerance)                 # [q, C], [q]
    q_aug = augment_queries(queries, a, s2, dtype)                                   # [1, q, D+1]
    state = kernels.init_state((1, q), bank.value_dim, dtype, queries.device, topk=track)
    if float((mask.sum(0) * bank.index.sizes()).sum()) > FULL_PASS_FRACTION * q * bank.num_keys:
        # little to skip: one plain pass in large chunks costs less than many small folds
        torch.set_num_threads(threads)
        for start, k_aug, logw, values in _pieces(bank, FULL_PASS_KEYS, dtype):
            state = kernels.accumulate(state, q_aug, k_aug, logw, values, 1.0, key_offset=start)
        torch.set_num_threads(1)
        evaluated, bound = q * bank.num_keys, torch.zeros(1)
    else:
        evaluated = _fold_clusters(state, q_aug, bank, mask, dtype, threads)
    if exact_fix:
        mean, best = exact_topk_correction(state, queries, a, s2, bank, memory_budget)
        return mean.to(dtype), best if provenance else None, evaluated, float(bound.max())
    best = state.topk_index[..., 0] if provenance else None
    return kernels.finalize(state), best, evaluated, float(bound.max())


def _pieces(bank: ClusteredBank, size: int, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    for start in range(0, bank.num_keys, size):
        yield (start, *bank.keys_between(start, min(start + size, bank.num_keys), dtype))


def _fold_clusters(state: kernels.SoftmaxState, q_aug: Tensor, bank: ClusteredBank, mask: Tensor,
                   dtype: torch.dtype, threads: int) -> int:
    """Fold into `state` (in place) cluster c for the queries where mask [q, C] is set, large folds on
    `threads` threads, small ones on one; returns the number of pairs folded."""
    q = q_aug.shape[1]
    index = bank.index
    users = mask.sum(0)                                                          # [C] queries per cluster
    by_cluster = mask.T.contiguous()                                             # [C, q]
    evaluated = int((users * index.sizes()).sum())
    for c in tqdm(torch.nonzero(users).reshape(-1).tolist(), disable=evaluated < PROGRESS_PAIRS,
                  desc="patch posterior", leave=False):
        rows = None if int(users[c]) == q else torch.nonzero(by_cluster[c]).reshape(-1)
        lo, hi = int(index.offsets[c]), int(index.offsets[c + 1])
        torch.set_num_threads(1 if int(users[c]) * (hi - lo) < SMALL_FOLD_PAIRS else threads)
        for start in range(lo, hi, PIECE_KEYS):
            k_aug, logw, values = bank.keys_between(start, min(start + PIECE_KEYS, hi), dtype)
            if rows is None:
                part = kernels.accumulate(state, q_aug, k_aug, logw, values, 1.0, key_offset=start)
                _put_state(state, torch.arange(q), part)
            else:
                part = kernels.accumulate(_take_state(state, rows), q_aug.index_select(1, rows), k_aug, logw,
                                          values, 1.0, key_offset=start)
                _put_state(state, rows, part)
    torch.set_num_threads(1)
    return evaluated


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
    prune: True, 'auto' (only banks of at least PRUNE_MIN_KEYS keys) or False (default): cluster the shared bank
    once per patch size (`cluster_bank`) and skip, per query, the clusters whose certified bound on mass is
    below `prune_tolerance` of the total (`pruned_posterior`). Off by default: exact to the bound, but on the
    CPU the fused kernel folds small patches faster than the bound pass and the per-cluster folds cost, and
    at large patches and high noise the bounds skip little. `last_stats` holds the last call's pairs
    evaluated, pairs of the raw bank and the largest bound on the neglected fraction of the mass;
    `history` one such dict per call.
    """

    def __init__(self, images: Tensor, *, grouping: str = "shared", padding: str = "circular",
                 log_weights: Tensor | None = None, valid_only: bool = False,
                 dtype: torch.dtype = torch.float32, chunk_images: int | None = None,
                 memory_budget: float = DEFAULT_MEMORY_BUDGET, cache: bool | str = "auto",
                 topk: int = DEFAULT_TOPK, prune: bool | str = False,
                 prune_tolerance: float = pruning.DEFAULT_TOLERANCE, clusters: int | None = None) -> None:
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
        self.last_stats: dict = {}
        self.history: list[dict] = []
        self._layouts: dict[int, list[GroupBatch]] = {}
        self._banks: dict[tuple[int, int], KeySource] = {}
        self._prior_means: dict[tuple[int, int], Tensor] = {}

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
                part = {"pairs_evaluated": q.shape[1] * source.num_keys * gb.groups,
                        "pairs_total": q.shape[1] * raw * gb.groups, "neglected_bound": 0.0}
            stats["pairs_evaluated"] += part["pairs_evaluated"]
            stats["pairs_total"] += part["pairs_total"]
            stats["neglected_bound"] = max(stats["neglected_bound"], part["neglected_bound"])
            locs = gb.query_locs.T                                                   # [Lq, G]
            out[:, locs] = mean.reshape(gb.groups, b, lq, c).permute(1, 2, 0, 3)
            if return_provenance:
                prov[:, locs] = source.sources(best).reshape(gb.groups, b, lq, 3).permute(1, 2, 0, 3)
        stats["fraction"] = stats["pairs_evaluated"] / max(1, stats["pairs_total"])
        self.last_stats = stats
        self.history.append(stats)
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
