"""PSPC, patch set posterior composites (Niedoba, Zwartsenberg, Murphy & Wood 2024, "Towards a mechanistic
explanation of diffusion model generalization", arXiv 2411.19339; PSPC-Square).

For a square patch size P, every position (y₀, x₀) where a P×P patch fits inside the image (y₀ ≤ H−P,
x₀ ≤ W−P; no padding, no wrapping) has its own patch set: the N training patches at that same position. The
posterior mean of the noisy patch over that set,
    m_{y₀x₀}(x) = Σ_j softmax_j(−‖x_Ω − √ᾱ·y_{j,Ω}‖² / (2(1−ᾱ))) y_{j,Ω},     Ω = the patch's pixels (all channels)
is a whole P×P patch; the composite averages, at each pixel, the means of every patch covering it. P = H = W is
the ideal (IS) denoiser. (In EDM variables x/√ᾱ, σ² = (1−ᾱ)/ᾱ this is the reference's empirical posterior.)

Patch-size schedules (`patch_size`, ᾱ → P; sizes above min(H, W) are clipped to it, i.e. the whole image):
- an int (any size ≥ 1; PSPC patches are anchored at a corner, so even sizes are fine);
- 'cifar': the CIFAR-10 schedule of the reference repository (plai-group/pspc, `CIFAR_PATCH_SCHEDULE`,
  the default of its `denoise.py`): 32 (×7), 23, 15, 11, 7, 5, 3 (×6) on the EDM grid of 18 noise levels
  σ = 80 → 0.002, ρ = 7, highest noise first, the nearest σ = √((1−ᾱ)/ᾱ) winning. (Stated from the released
  code; that it is the schedule behind the paper's CIFAR-10 figures is the repository's word, not checked
  against the paper's text.)
- a list of sizes: the same convention as 'cifar' (highest noise first, EDM grid of that many levels);
- {"sizes": [...], "sigmas": [...]} or {"sizes": [...], "alpha_bars": [...]}: nearest listed noise level wins;
- a function ᾱ → P.

flips=True adds the horizontal mirror image of every training image to the data, as the reference does by
default (CIFAR-10 networks are trained with x-flips); off by default here because the bank is the data the
network was trained on.

Implementation: each patch position is a group of the engine whose keys are the training patches there and
whose values are those same patches (`PatchSets`): one batched, streamed
`softmax_posterior` per patch size replaces the reference's Python loop over positions, and the bank of a
patch size is held (deduplicated: identical patches merge exactly, the value being the key) when it takes at
most an eighth of the memory budget.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ...data import ImageSet
from ...engine import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TOPK,
    KeySource,
    build_cached_bank,
    fused,
    noise_coefficients,
    softmax_posterior,
)
from ...engine.banks import CachedBank, held_bytes
from ...engine.gemm_route import fold_path
from ...schedules import karras_sigmas
from ..base import Denoiser
from ..machines import resolve_dtype
from ..registry import ModelConfigError, register_model
from ._common import TheoryMachine

Tensor = torch.Tensor

# plai-group/pspc, pspc/denoisers.py: CIFAR_PATCH_SCHEDULE, in descending order of t on edm_t_schedule(18)
CIFAR_PATCH_SCHEDULE = (32,) * 7 + (23, 15, 11, 7, 5) + (3,) * 6
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or int(size) != size or size < 1:
        raise ModelConfigError(f"pspc: a patch size must be a positive integer, got {size!r}")
    return int(size)


def sigma_of(alpha_bar: float) -> float:
    """The EDM noise level σ = √((1−ᾱ)/ᾱ) of a VP ᾱ (∞ at ᾱ = 0)."""
    return math.inf if alpha_bar <= 0 else math.sqrt(max(1.0 - alpha_bar, 0.0) / alpha_bar)


class SizeSchedule:
    """P at the listed noise level nearest to the query: sizes[i] belongs to sigmas[i] (EDM σ)."""

    def __init__(self, sizes: Sequence[int], sigmas: Sequence[float]) -> None:
        if len(sizes) != len(sigmas) or not sizes:
            raise ModelConfigError(f"pspc: a schedule needs one size per noise level, got {len(sizes)} sizes for "
                                   f"{len(sigmas)} levels")
        self.sizes = [_check_size(p) for p in sizes]
        self.sigmas = [float(s) for s in sigmas]

    @classmethod
    def edm(cls, sizes: Sequence[int]) -> SizeSchedule:
        """The reference's convention: sizes listed from the highest noise to the lowest on the EDM grid of
        len(sizes) levels (σ 80 → 0.002, ρ = 7)."""
        return cls(sizes, karras_sigmas(len(sizes), EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO).tolist())

    def __call__(self, alpha_bar: float) -> int:
        sigma = sigma_of(float(alpha_bar))
        if math.isinf(sigma):
            return self.sizes[max(range(len(self.sigmas)), key=lambda i: self.sigmas[i])]
        return self.sizes[min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - sigma))]

    def to_config(self) -> dict[str, list]:
        return {"sizes": list(self.sizes), "sigmas": list(self.sigmas)}


def size_schedule(patch_size: Any) -> Callable[[float], int]:
    """Every accepted form of `patch_size` (module docstring) as a function ᾱ → P (before clipping)."""
    if isinstance(patch_size, str):
        if patch_size != "cifar":
            raise ModelConfigError(f"pspc: the named schedule is 'cifar', got {patch_size!r}")
        return SizeSchedule.edm(CIFAR_PATCH_SCHEDULE)
    if isinstance(patch_size, (int, float)) and not isinstance(patch_size, bool):
        size = _check_size(patch_size)
        return lambda _ab: size
    if isinstance(patch_size, SizeSchedule):
        return patch_size
    if isinstance(patch_size, dict):
        if set(patch_size) == {"sizes", "sigmas"}:
            return SizeSchedule(patch_size["sizes"], patch_size["sigmas"])
        if set(patch_size) == {"sizes", "alpha_bars"}:
            return SizeSchedule(patch_size["sizes"], [sigma_of(float(v)) for v in patch_size["alpha_bars"]])
        raise ModelConfigError(f"pspc: a schedule dict has the keys 'sizes' and 'sigmas' or 'alpha_bars', got "
                               f"{sorted(patch_size)}")
    if callable(patch_size):
        return lambda ab: _check_size(patch_size(ab))
    if isinstance(patch_size, (list, tuple)) and patch_size:
        return SizeSchedule.edm(list(patch_size))
    raise ModelConfigError(f"pspc: patch_size must be an int, 'cifar', a list of sizes (highest noise first, EDM "
                           f"grid), a schedule dict or a function of alpha_bar; got {patch_size!r}")


def patch_layout(image_shape: tuple[int, int, int], size: int, device: torch.device
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(table [L, C·P²] of flattened coordinates of every patch that fits, in (c, dy, dx) order; anchors [L, 2]
    (y₀, x₀); counts [C·H·W] of patches covering each coordinate) for P = size."""
    c, h, w = image_shape
    ys = torch.arange(h - size + 1, device=device)
    xs = torch.arange(w - size + 1, device=device)
    anchors = torch.cartesian_prod(ys, xs).reshape(-1, 2)                          # [L, 2]
    d = torch.arange(size, device=device)
    offsets = (torch.arange(c, device=device)[:, None, None] * (h * w) + d[None, :, None] * w
               + d[None, None, :]).reshape(-1)                                     # [C·P²]
    table = (anchors[:, 0] * w + anchors[:, 1])[:, None] + offsets[None, :]
    counts = torch.bincount(table.reshape(-1), minlength=c * h * w)
    return table, anchors, counts


class PatchSets(KeySource):
    """The patch sets of one patch size P: group g is the position anchors[g] = (y₀, x₀) of a P×P patch that
    fits; its keys are the N training patches there ([C·P²], channel-major, as `unfold` cuts them) and each
    key's value is the key itself. Chunks of training images are copied from a strided window view straight
    into the augmented layout [k, ‖k‖²]; `gather` reads given keys through the flat coordinate table [G, C·P²]."""

    def __init__(self, images: Tensor, log_weights: Tensor, size: int, table: Tensor, anchors: Tensor) -> None:
        self.images = images.detach().to(torch.float32).contiguous()              # [N, C, H, W]
        self.flat = self.images.reshape(self.images.shape[0], -1)                 # [N, C·H·W]
        self.device = self.images.device
        self.log_weights = log_weights.to(self.device)                             # [N]
        self.size, self.table, self.anchors = size, table.to(self.device), anchors.to(self.device)
        self.groups, self.dim = self.table.shape
        self.value_dim = self.dim
        self.num_keys = self.chunk_keys = self.images.shape[0]
        self.bytes_per_key_extra = 0.0                                             # cut in place

    def set_chunk_keys(self, keys: int) -> None:
        self.chunk_keys = max(1, int(keys))

    def _windows(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """The patches of images start…stop−1 as a strided view [Ly, Lx, n, C, P, P] (nothing copied)."""
        p = self.size
        return self.images[start:stop].to(dtype).unfold(2, p, 1).unfold(3, p, 1).permute(2, 3, 0, 1, 4, 5)

    def _cut_into(self, out: Tensor, start: int, stop: int, dtype: torch.dtype) -> None:
        """Write the keys of images start…stop−1 into out [G, n, C·P²] (rows may be padded): one strided copy."""
        win = self._windows(start, stop, dtype)
        out.view(*win.shape).copy_(win)

    def _logw(self, start: int, n: int, dtype: torch.dtype) -> Tensor:
        return self.log_weights[start:start + n].to(dtype)[None].expand(self.groups, -1)

    def chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for start in range(0, self.num_keys, self.chunk_keys):
            stop = min(start + self.chunk_keys, self.num_keys)
            keys = torch.empty(self.groups, stop - start, self.dim, dtype=dtype, device=self.device)
            self._cut_into(keys, start, stop, dtype)
            yield start, keys, self._logw(start, stop - start, dtype), keys

    def augmented_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for start in range(0, self.num_keys, self.chunk_keys):
            stop = min(start + self.chunk_keys, self.num_keys)
            out = torch.empty(self.groups, stop - start, self.dim + 1, dtype=dtype, device=self.device)
            keys = out[..., :self.dim]
            self._cut_into(keys, start, stop, dtype)
            torch.linalg.vector_norm(keys, dim=-1, out=out[..., self.dim])
            out[..., self.dim].square_()
            yield start, out, self._logw(start, stop - start, dtype), keys

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Exact float64 keys [G, Q, k, C·P²] (= values) and logw [G, Q, k] of image indices [G, Q, k]."""
        idx = index.clamp_min(0)
        lead = (self.groups,) + (1,) * (index.ndim - 1)
        keys = self.flat[idx[..., None], self.table.reshape(*lead, self.dim)].double()
        return keys, self.log_weights[idx].double().masked_fill(index < 0, -math.inf), keys

    def sources(self, index: Tensor) -> Tensor:
        """[G, ..., 3]: (training image, y₀, x₀) of each key."""
        anchor = self.anchors.reshape(self.groups, *([1] * (index.ndim - 1)), 2).expand(*index.shape, 2)
        return torch.cat([index.clamp_min(0)[..., None], anchor], dim=-1)


def held_bank(source: PatchSets, cache: bool | str, memory_budget: float) -> KeySource:
    """The source itself (streamed), or its keys collected once into a deduplicated `CachedBank` (exact: a
    key's value is the key) when cache is True, or 'auto' and the bank takes at most an eighth of the memory
    budget (the engine's rule for patch banks)."""
    raw = source.groups * source.num_keys * (source.dim + source.value_dim + 8) * 4
    if cache is True or (cache == "auto" and 8 * raw <= memory_budget):
        return build_cached_bank(source, dedup=True)
    return source


class PatchSetBank:
    """One training set (with its mirror images when flips), its patch layouts and held banks per size."""

    def __init__(self, images: Tensor, flips: bool, cache: bool | str, memory_budget: float) -> None:
        images = images.detach().to(torch.float32)
        self.images = (torch.cat([images, images.flip(-1)]) if flips else images).contiguous()
        self.log_weights = torch.zeros(self.images.shape[0], dtype=torch.float64, device=self.images.device)
        self.cache, self.memory_budget = cache, memory_budget
        self._layouts: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._banks: dict[int, Any] = {}

    def to(self, device: torch.device) -> PatchSetBank:
        device = torch.device(device)
        if device != self.images.device:
            self.images, self.log_weights = self.images.to(device), self.log_weights.to(device)
            self._layouts, self._banks = {}, {}
        return self

    def layout(self, size: int) -> tuple[Tensor, Tensor, Tensor]:
        if size not in self._layouts:
            self._layouts[size] = patch_layout(tuple(self.images.shape[1:]), size, self.images.device)
        return self._layouts[size]

    def source(self, size: int) -> Any:
        """The key source of patch size `size`: held (deduplicated) when small enough, else streamed."""
        if size not in self._banks:
            table, anchors, _ = self.layout(size)
            stream = PatchSets(self.images, self.log_weights, size, table, anchors)
            self._banks[size] = held_bank(stream, self.cache, self.memory_budget)
            # a sampler walks through its patch sizes in order: keep the held banks within a quarter of the budget
            while len(self._banks) > 1 and sum(held_bytes(b) for b in self._banks.values()) > self.memory_budget / 4:
                del self._banks[next(iter(self._banks))]
        return self._banks[size]


class PSPC(TheoryMachine):
    """PSPC-Square (see the module docstring)."""

    def __init__(self, data: ImageSet, patch_size: Any, flips: bool, conditional: bool, dtype: torch.dtype,
                 memory_budget: float, topk: int, cache: bool | str) -> None:
        size_of = size_schedule(patch_size)
        super().__init__(data, "pspc", conditional,
                         lambda images: PatchSetBank(images, flips, cache, memory_budget),
                         {"patch_size": _jsonable_size(patch_size, size_of), "flips": bool(flips),
                          "dtype": str(dtype).replace("torch.", "")})
        self.size_of, self.flips, self.dtype = size_of, bool(flips), dtype
        self.memory_budget, self.topk = float(memory_budget), int(topk)

    def patch_size_at(self, alpha_bar: float) -> int:
        """P used at ᾱ (after clipping to min(H, W))."""
        return min(self.size_of(float(alpha_bar)), min(self.image_shape[1:]))

    def _part(self, bank: PatchSetBank, x: Tensor, alpha_bar: Tensor, label: int | None) -> Tensor:
        b = x.shape[0]
        out = torch.zeros(b, math.prod(self.image_shape), dtype=torch.float64, device=x.device)
        sizes = [self.patch_size_at(v) for v in alpha_bar.tolist()]
        for size in dict.fromkeys(sizes):
            rows = torch.tensor([i for i, p in enumerate(sizes) if p == size], device=x.device)
            table, _, counts = bank.layout(size)
            source = bank.source(size)
            windows = x[rows].detach().to(self.dtype).unfold(2, size, 1).unfold(3, size, 1)
            queries = windows.permute(2, 3, 0, 1, 4, 5).reshape(table.shape[0], len(rows), -1)   # [L, b', C·P²]
            a, s2 = noise_coefficients(alpha_bar[rows].to(torch.float64))
            g = queries.shape[0]
            means, _ = softmax_posterior(queries, a[None].expand(g, -1), s2[None].expand(g, -1), source,
                                         dtype=self.dtype, topk=self.topk, memory_budget=self.memory_budget)
            composite = torch.zeros(len(rows), out.shape[1], dtype=torch.float64, device=x.device)
            composite.index_add_(1, table.reshape(-1), means.permute(1, 0, 2).reshape(len(rows), -1).double())
            out[rows] = composite / counts.to(torch.float64)
            self._log.append({"label": label, "cross_term": "pspc", "patch_size": size, "device": str(x.device),
                              "fold": fold_path(self.dtype, x.device, False)
                              if source.value_dim <= fused.MAX_VALUE_DIM else "reference",
                              "cached": isinstance(source, CachedBank), "alpha_bar": alpha_bar[rows].tolist(),
                              "neglected_bound": 0.0})
        return out.reshape(x.shape).to(x.dtype)


def _jsonable_size(patch_size: Any, size_of: Callable[[float], int]) -> Any:
    if isinstance(size_of, SizeSchedule) and not isinstance(patch_size, str):
        return size_of.to_config()
    return repr(patch_size) if callable(patch_size) else patch_size


@register_model("pspc")
def build_pspc(data: ImageSet, patch_size: Any = "cifar", flips: bool = False, conditional: bool = False,
               dtype: torch.dtype | str = torch.float32, memory_budget: float = DEFAULT_MEMORY_BUDGET,
               topk: int = DEFAULT_TOPK, cache: bool | str = "auto") -> Denoiser:
    """PSPC-Square (Niedoba et al. 2024): position-specific patch posteriors of every patch that fits, their
    means averaged per pixel; patch_size an int, 'cifar' (the reference's CIFAR-10 schedule, default), a list
    (highest noise first on the EDM grid), a schedule dict or a function of ᾱ; flips adds mirrored images."""
    if cache not in ("auto", True, False):
        raise ModelConfigError(f"pspc: cache must be 'auto', True or False, got {cache!r}")
    return PSPC(data, patch_size, flips, conditional, resolve_dtype(dtype), memory_budget, topk, cache)
