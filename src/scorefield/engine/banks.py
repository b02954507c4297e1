"""Key sources: where the bank's keys, log-weights and values come from.

A key source holds, for G groups of queries, the keys k_j (training patches φ, or whole images for IS/ES),
log-weights logw_j and values v_j = ϕ_j(0) of the posterior Σ_j softmax_j(ℓ_j) v_j of kamb-ganguli eq. 9–10 /
39–40, and hands them to the streaming posterior in chunks augmented to [k, ‖k‖²]. StreamedPatches cuts patches
from the training images on the fly (memory bounded whatever the dataset size); CachedBank holds a bank built
once and deduplicated (identical keys merge into one key of log-weight logsumexp(logw), which is exact);
WholeImages serves the training images or all their circular translates (IS eq. 3–4, ES eq. 5–6); ClusteredBank
sorts a single-group bank by k-means cluster so that whole clusters can be skipped under a certified bound
(`pruning`). Every source can return the exact float64 keys of given indices and their provenance.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from . import pruning
from .errors import PatchConfigError
from .geometry import centre_columns, gather_patches, patch_index

Tensor = torch.Tensor

ASSIGN_CHUNK_KEYS = 2**16                # keys cut at once while clustering a streamed bank
MERGE_MIN_SAVING = 0.9                   # a streamed chunk is merged when that leaves at most this fraction


def augment_keys(keys: Tensor) -> Tensor:
    """[k, ‖k‖²]: [G, K, D+1]."""
    return torch.cat([keys, (keys * keys).sum(-1, keepdim=True)], dim=-1)



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
    folded_keys: int = 0               # keys per group folded by the last pass (`mapped_chunks`)
    device: torch.device               # where the keys live (the device of the training images)

    def set_chunk_keys(self, keys: int) -> None:
        self.chunk_keys = max(1, int(keys))

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def augmented_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """As `chunks`, with keys augmented to [k, ‖k‖²]: [G, K, D+1] (what the kernel folds)."""
        for offset, keys, logw, values in self.chunks(dtype):
            yield offset, augment_keys(keys), logw, values

    def mapped_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor | None,
                                                                  Tensor | None]]:
        """As `augmented_chunks`, plus (index, extra) of merged keys, here None: key u of a chunk is global key
        offset + u (see `StreamedPatches.mapped_chunks`)."""
        self.folded_keys = 0
        for offset, k_aug, logw, values in self.augmented_chunks(dtype):
            self.folded_keys += k_aug.shape[1]
            yield offset, k_aug, logw, values, None, None

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
                 key_locs: Tensor, dedup: bool = False) -> None:
        self.images = images                                         # [N, C, H, W]
        self.dedup = bool(dedup)                                     # merge identical keys of each chunk
        self.folded_keys = 0                                         # keys per group folded by the last pass
        self.log_weights = log_weights                               # [N]
        n, c, h, w = images.shape
        self.width = w
        self.device = images.device                                  # the bank lives where its images do
        self.key_locs = key_locs.to(self.device)                     # [G, Lk]
        self.groups, self.locs_per_image = key_locs.shape
        self.index = patch_index(h, w, patch_size, padding).to(self.device)   # [HW, PP]
        self.centre = centre_columns(c, patch_size).to(self.device)
        self.dim = c * patch_size * patch_size
        self.value_dim = c
        self.num_keys = n * self.locs_per_image
        self.chunk_keys = self.num_keys

    @property
    def bytes_per_key_extra(self) -> float:
        """Gathered patches before the permute, and the merged copy when deduplicating."""
        return (4.0 if self.dedup else 3.0) * self.dim

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

    def mapped_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor | None,
                                                                  Tensor | None]]:
        """As `augmented_chunks`, plus (index [G, U], extra [G, U]) when `dedup`: each chunk's identical keys
        merged into one key of log-weight logsumexp(logw) (exact: identical keys have identical logits and,
        the value being the patch centre, identical values). Folded key u of group g stands for global key
        index[g, u] (its first occurrence in the chunk; −1 for padding of log-weight −inf) and its log-weight
        exceeds that key's own by extra[g, u] (float64); a chunk whose merge would leave more than
        MERGE_MIN_SAVING of its keys is folded as cut (index offset + u, extra 0). Without `dedup` both are
        None."""
        self.folded_keys = 0
        if not self.dedup or self.images.dtype != torch.float32:       # rows are hashed as float32 bits
            yield from super().mapped_chunks(dtype)
            return
        for offset, keys, _, _ in self.chunks(self.images.dtype):
            logw64 = self.log_weights[offset // self.locs_per_image:][:keys.shape[1] // self.locs_per_image]
            logw64 = logw64.double()[None, :, None].expand(self.groups, -1, self.locs_per_image)
            logw64 = logw64.reshape(self.groups, -1)
            hashes = [projection_hashes(keys[g]) for g in range(self.groups)]
            distinct = max(int(torch.unique(h).shape[0]) for h in hashes)
            parts = [] if distinct > MERGE_MIN_SAVING * keys.shape[1] else [
                _dedup_chunk(keys[g], logw64[g], hashes[g]) for g in range(self.groups)]
            u = max(p[0].shape[0] for p in parts) if parts else keys.shape[1]
            full = augment_keys(keys)                                         # [G, K, D+1]
            del keys
            if u > MERGE_MIN_SAVING * full.shape[1]:   # too few duplicates to pay for the copy: fold as cut
                self.folded_keys += full.shape[1]
                index = torch.arange(offset, offset + full.shape[1], device=self.device).expand(self.groups, -1)
                full = _augmented(full, dtype)
                yield (offset, full, logw64.to(dtype), full[..., self.centre], index,
                       torch.zeros(self.groups, full.shape[1], dtype=torch.float64, device=self.device))
                continue
            first = torch.full((self.groups, u), -1, dtype=torch.int64, device=self.device)
            merged = torch.full((self.groups, u), -math.inf, dtype=torch.float64, device=self.device)
            extra = torch.zeros(self.groups, u, dtype=torch.float64, device=self.device)
            picked = (full.new_empty if len({p[0].shape[0] for p in parts}) == 1 else full.new_zeros)(
                self.groups, u, self.dim + 1)
            for g, (idx, lse) in enumerate(parts):
                first[g, :idx.shape[0]] = idx + offset
                merged[g, :idx.shape[0]] = lse
                extra[g, :idx.shape[0]] = lse - logw64[g, idx]
                torch.index_select(full[g], 0, idx, out=picked[g, :idx.shape[0]])
            del full
            self.folded_keys += u
            picked = _augmented(picked, dtype)
            yield offset, picked, merged.to(dtype), picked[..., self.centre], first, extra

    def _locate(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(image [G, ...], location [G, ...]) of global key indices [G, ...] (clamped to valid)."""
        idx = index.clamp_min(0)
        image = idx // self.locs_per_image
        slot = idx % self.locs_per_image
        g = torch.arange(self.groups, device=idx.device).reshape(-1, *([1] * (idx.ndim - 1))).expand_as(idx)
        return image, self.key_locs[g, slot]

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image, loc = self._locate(index)                                  # [G, Q, k]
        c = self.images.shape[1]
        flat = torch.cat([self.images.reshape(self.images.shape[0], c, -1),
                          self.images.new_zeros(self.images.shape[0], c, 1)], dim=2)   # [N, C, HW+1]
        pix = self.index[loc]                                             # [G, Q, k, PP]
        channel = torch.arange(c, device=self.device)[:, None]
        keys = flat[image[..., None, None], channel, pix[..., None, :]]                 # [G, Q, k, C, PP]
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
        channel = torch.arange(c, device=self.device)[:, None]
        keys = flat[image[0][:, None, None], channel, self.index[loc[0]][:, None, :]]
        keys = keys.reshape(index.shape[0], self.dim)                     # [M, D]
        return keys, self.log_weights[image[0]].to(torch.float32), keys[:, self.centre]


class CachedBank(KeySource):
    """A bank held in memory: keys [G, K, D], logw [G, K], values [G, K, V], sources [G, K, 3]; groups padded
    to equal K with keys of log-weight −inf (always after the real keys)."""

    def __init__(self, keys: Tensor, logw: Tensor, values: Tensor, sources: Tensor) -> None:
        # the augmented keys are what every call folds: kept once, the raw keys are a view of them
        self.keys_aug = augment_keys(keys.to(torch.float32))                  # [G, K, D+1]
        self.device = keys.device
        self.keys = self.keys_aug[..., :-1]
        self.logw, self.values, self.source_table = logw, values, sources
        self.groups, self.num_keys, self.dim = keys.shape
        self.value_dim = values.shape[-1]
        self.chunk_keys = self.num_keys

    def to(self, device: torch.device | str) -> CachedBank:
        """The same bank on `device` (self when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = CachedBank(self.keys.to(device), self.logw.to(device), self.values.to(device),
                           self.source_table.to(device))
        if hasattr(self, "raw_keys"):
            moved.raw_keys = self.raw_keys
        return moved

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
        g = torch.arange(self.groups, device=index.device).reshape(-1, *([1] * (index.ndim - 1))).expand_as(index)
        return g, index.clamp_min(0)

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g, j = self._rows(index)
        logw = self.logw[g, j].double().masked_fill(index < 0, -math.inf)
        return self.keys[g, j].double(), logw, self.values[g, j].double()

    def sources(self, index: Tensor) -> Tensor:
        g, j = self._rows(index)
        return self.source_table[g, j]


def held_bytes(source: KeySource) -> int:
    """Bytes a key source keeps in memory between calls (its cached keys, cluster order and centroids)."""
    held = [getattr(source, name, None) for name in ("keys_aug", "logw", "values", "source_table", "rep_keys")]
    extra = 0
    if isinstance(source, ClusteredBank):
        held += [source.index.order, source.index.centroids]
        extra = held_bytes(source.base) if isinstance(source.base, CachedBank) else 0
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
        self.device = images.device
        ys, xs = torch.arange(h, device=self.device), torch.arange(w, device=self.device)
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
        channel = torch.arange(c, device=self.device)[:, None]
        return flat[image_idx[:, None, None], channel, self.shift_index[shift][:, None, :]
                    ].reshape(n, -1)

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        per_chunk = max(1, self.chunk_keys // self.shifts)
        n_img = self.images.shape[0]
        for start in range(0, n_img, per_chunk):
            idx = torch.arange(start, min(start + per_chunk, n_img), device=self.device)
            img = idx.repeat_interleave(self.shifts)
            shift = torch.arange(self.shifts, device=self.device).repeat(idx.shape[0])
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
    mult = torch.randint(1, 2**62, (keys.shape[1],), generator=gen, dtype=torch.int64, device="cpu") | 1
    mult = mult.to(keys.device)                                       # odd multipliers, the same on every device
    out = torch.empty(keys.shape[0], dtype=torch.int64, device=keys.device)
    for start in range(0, keys.shape[0], block):          # int64 products wrap: a deterministic hash
        out[start:start + block] = (bits[start:start + block].long() * mult).sum(-1)
    return out


def projection_hashes(keys: Tensor) -> Tensor:
    """A 64-bit hash [K] of each row of keys [K, D] (float32) from two random projections (one small GEMM):
    equal rows almost always hash equally (a GEMM may sum an edge row in another order, which only leaves
    a duplicate unmerged); unequal rows that collide are caught by `unique_rows`' check."""
    gen = torch.Generator().manual_seed(12345)
    proj = torch.randn(keys.shape[1], 2, generator=gen, device="cpu").to(keys.device, keys.dtype)
    bits = (keys @ proj).contiguous().view(torch.int32).long()                   # [K, 2]
    return (bits[:, 0] << 32) | (bits[:, 1] & 0xFFFFFFFF)


def _rows_match(keys: Tensor, rep: Tensor, block: int = 16384) -> bool:
    """Whether every row keys[i] equals keys[rep[i]], checked block by block over the rows i ≠ rep[i]."""
    rows = torch.nonzero(rep != torch.arange(rep.shape[0], device=rep.device)).reshape(-1)
    return all(torch.equal(keys[rep[rows[i:i + block]]], keys[rows[i:i + block]])
               for i in range(0, rows.shape[0], block))


def unique_rows(keys: Tensor, hashes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(first occurrence [U], inverse [K]) of the distinct rows of keys [K, D]: sort-free hashing (`row_hashes`
    unless `hashes` [K] are given), then a check that every row equals its representative (exact: a hash
    collision falls back to a row sort)."""
    _, inverse = torch.unique(row_hashes(keys) if hashes is None else hashes, return_inverse=True)
    u = int(inverse.max()) + 1 if inverse.numel() else 0
    first = torch.full((u,), keys.shape[0], dtype=torch.int64, device=keys.device).scatter_reduce(
        0, inverse, torch.arange(keys.shape[0], device=keys.device), "amin")
    if not _rows_match(keys, first[inverse]):
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        u = int(inverse.max()) + 1
        first = torch.full((u,), keys.shape[0], dtype=torch.int64, device=keys.device).scatter_reduce(
            0, inverse, torch.arange(keys.shape[0], device=keys.device), "amin")
    return first, inverse


def _dedup_chunk(keys: Tensor, logw: Tensor, hashes: Tensor) -> tuple[Tensor, Tensor]:
    """(first occurrence [U] in increasing order, logsumexp of the merged logw [U]) of the distinct rows of
    keys [K, D] with log-weights logw [K] (float64), given their `projection_hashes`."""
    first, inverse = unique_rows(keys, hashes)
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    first, inverse = first[order], rank[inverse]
    u = first.shape[0]
    top = torch.full((u,), -math.inf, dtype=logw.dtype, device=logw.device).scatter_reduce(0, inverse, logw, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros(u, dtype=logw.dtype, device=logw.device).index_add_(0, inverse, torch.exp(logw - safe[inverse]))
    return first, safe + torch.log(mass)


def dedup_bank(keys: Tensor, logw: Tensor, values: Tensor, sources: Tensor) -> tuple[Tensor, ...]:
    """Merge identical keys of one group (keys [K, D], logw [K], values [K, V], sources [K, 3]) into one key
    with log-weight logsumexp(logw) — exact, since identical keys have identical logits and the value is a
    function of the key whenever it is a patch centre. The source kept is the first occurrence."""
    first, inverse = unique_rows(keys)
    u = first.shape[0]
    top = torch.full((u,), -math.inf, dtype=logw.dtype, device=logw.device).scatter_reduce(0, inverse, logw, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros(u, dtype=logw.dtype, device=logw.device).index_add_(0, inverse, torch.exp(logw - safe[inverse]))
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
    idx = torch.arange(keys.shape[1], device=keys.device).expand(source.groups, -1)
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
        self.base, self.index, self.device = base, index, base.device
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
    sample = torch.randperm(k, generator=gen, device="cpu")[:min(k, pruning.SAMPLE_PER_CLUSTER * clusters)]
    sample = sample.to(base.device)
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

