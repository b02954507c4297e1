"""Analytic local score machines (IS, ES, LS, ELS, bbELS, two-state tanh, patch dictionary).

Every machine is a `Denoiser`: model(x [B, C, H, W], ᾱ [B], labels) → x̂₀ [B, C, H, W], the posterior mean
whose score is (√ᾱ·x̂₀ − x)/(1−ᾱ) (kamb-ganguli eq. 3, 7, 9, 41). All but the closed-form tanh machine are
configurations of the patch-posterior engine (`scorefield.engine`).

Patch-size schedules (`patch_size`): an odd int; a callable ᾱ → P; a list of (alpha_bar_threshold, P) pairs,
meaning "use P when ᾱ ≥ threshold", checked in the order given (put the highest threshold first; the last
pair should have threshold 0); a `PatchSchedule` (sizes at given ᾱ, nearest ᾱ wins; what calibration
builds) or its plain form {"sizes": [...], "alpha_bars": [...]}; or a list of odd ints, one per sampler step
listed from the lowest noise to the highest (the calibrated lists of the released code), read on the grid
t_i = i/n, i = 1…n of the cosine schedule (the times a DDIM sampler of n steps evaluates the denoiser at),
the nearest grid ᾱ winning.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..engine import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TOPK,
    CachedBank,
    PatchConfigError,
    PatchPosterior,
    StreamedPatches,
    build_cached_bank,
    centre_columns,
    check_padding,
    check_patch_size,
    extract_patches,
    group_layout,
    image_posterior,
    noise_coefficients,
    softmax_posterior,
)
from ..engine.gemm_route import fold_path
from ..engine.multisize_route import denoise_sizes
from ..engine.patch_posterior import check_patch_fits
from ..schedules import get_schedule
from .base import Denoiser, DenoiserInputError, check_denoiser_inputs
from .registry import ModelConfigError, register_model

Tensor = torch.Tensor
PatchSize = int | Callable[[float], int] | Sequence[int] | Sequence[tuple[float, int]] | dict[str, list]


# ---- patch-size schedules ----------------------------------------------------------------------------------

class PatchSchedule:
    """P as a function of ᾱ: the size listed at the grid ᾱ nearest to the query ᾱ.

    sizes[i] belongs to alpha_bars[i]; both listed in the same order (any)."""

    def __init__(self, sizes: Sequence[int], alpha_bars: Sequence[float]) -> None:
        if len(sizes) != len(alpha_bars) or not sizes:
            raise ModelConfigError(f"a patch schedule needs one size per grid point, got {len(sizes)} sizes "
                                   f"for {len(alpha_bars)} grid points")
        self.sizes = [check_patch_size(p) for p in sizes]
        self.alpha_bars = torch.tensor([float(v) for v in alpha_bars], dtype=torch.float64, device="cpu")

    def __call__(self, alpha_bar: float) -> int:
        return self.sizes[int((self.alpha_bars - float(alpha_bar)).abs().argmin())]

    def __repr__(self) -> str:
        return f"PatchSchedule(sizes={self.sizes})"

    def to_config(self) -> dict[str, list]:
        """Plain data that `patch_size_function` turns back into this schedule (saved in run configs)."""
        return {"sizes": list(self.sizes), "alpha_bars": self.alpha_bars.tolist()}


def calibrated_patch_schedule(sizes: Sequence[int], schedule: str = "cosine") -> PatchSchedule:
    """A per-step list of patch sizes, listed from the lowest noise to the highest, as a function of ᾱ.

    Step i = 1…n of an n-step sampler on the uniform grid evaluates the denoiser at t = i/n (t = 1 is pure
    noise), so sizes[i−1] belongs to ᾱ(i/n) — the released code stored it there but read it at index i."""
    n = len(sizes)
    t = torch.arange(1, n + 1, dtype=torch.float64, device="cpu") / n
    return PatchSchedule(sizes, get_schedule(schedule).alpha_bar(t).tolist())


def patch_size_function(patch_size: PatchSize, schedule: str = "cosine") -> Callable[[float], int]:
    """Normalize every accepted form of `patch_size` (see the module docstring) to a function ᾱ → P."""
    if patch_size is None:
        raise ModelConfigError("patch_size is required: an odd int, a list of sizes per step, a list of "
                               "(alpha_bar_threshold, P) pairs, or a function of alpha_bar")
    if isinstance(patch_size, (int, float)) and not isinstance(patch_size, bool):
        size = check_patch_size(patch_size)
        return lambda _ab: size
    if isinstance(patch_size, PatchSchedule):
        return patch_size
    if isinstance(patch_size, dict):
        if set(patch_size) != {"sizes", "alpha_bars"}:
            raise ModelConfigError(f"a patch schedule dict needs exactly the keys 'sizes' and 'alpha_bars', got "
                                   f"{sorted(patch_size)}")
        return PatchSchedule(patch_size["sizes"], patch_size["alpha_bars"])
    if callable(patch_size):
        return lambda ab: check_patch_size(patch_size(ab))
    items = list(patch_size)
    if items and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in items):
        pairs = [(float(th), check_patch_size(p)) for th, p in items]

        def by_threshold(ab: float) -> int:
            for threshold, size in pairs:
                if ab >= threshold:
                    return size
            return pairs[-1][1]
        return by_threshold
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return calibrated_patch_schedule(items, schedule)
    raise ModelConfigError(f"patch_size must be an odd int, a list of odd ints, a list of (threshold, size) "
                           f"pairs or a function of alpha_bar; got {patch_size!r}")


def _listed_sizes(patch_size: PatchSize, size_of: Callable[[float], int]) -> list[int]:
    """The patch sizes a schedule can return, where they are known before any call (not for a callable)."""
    if isinstance(size_of, PatchSchedule):
        return list(size_of.sizes)
    if isinstance(patch_size, (int, float)) and not isinstance(patch_size, bool):
        return [int(patch_size)]
    if isinstance(patch_size, (list, tuple)):
        return [int(v[1]) if isinstance(v, (list, tuple)) else int(v) for v in patch_size]
    return []


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / torch.float64, also from the strings 'float32' / 'float64' (configs, CLI)."""
    table = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64}
    if dtype not in table:
        raise ModelConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    return table[dtype]


def _jsonable_patch_size(patch_size: PatchSize) -> Any:
    if isinstance(patch_size, PatchSchedule):
        return patch_size.to_config()
    return repr(patch_size) if callable(patch_size) and not isinstance(patch_size, int) else patch_size


# ---- engine-backed machines --------------------------------------------------------------------------------

class Conditioned:
    """Maps a label to the engine (or image tensor) built on that class's training images only."""

    def __init__(self, data: ImageSet, conditional: bool, build: Callable[[Tensor], Any]) -> None:
        if conditional and data.labels is None:
            raise ModelConfigError(f"conditional=True needs a labelled dataset; '{data.name}' has no labels")
        self.data, self.conditional, self.build = data, conditional, build
        self.device = data.images.device
        self._cache: dict[int | None, tuple[Any, Tensor]] = {}

    def items(self) -> list[tuple[int | None, tuple[Any, Tensor]]]:
        return list(self._cache.items())

    def to(self, device: torch.device) -> None:
        """Build on `device` from now on and move what was built (engines or image tensors) there."""
        self.device = device
        self._cache = {label: (built.to(device), index) for label, (built, index) in self._cache.items()}

    def get(self, label: int | None) -> tuple[Any, Tensor]:
        """(engine, dataset indices of its images)."""
        if label not in self._cache:
            host = self.data.images.device
            if label is None:
                index = torch.arange(len(self.data), device=host)
            else:
                index = torch.nonzero(self.data.labels.to(host) == label).reshape(-1)
                if index.numel() == 0:
                    raise DenoiserInputError(f"no training image has label {label}")
            self._cache[label] = (self.build(self.data.images[index].to(self.device)), index.to(self.device))
        return self._cache[label]


def _split_batch(ab: Tensor, labels: Tensor | None, conditional: bool,
                 size_of: Callable[[float], int] | None) -> dict[tuple[int | None, int], Tensor]:
    """Sample indices (on ᾱ's device) grouped by (label or None, patch size)."""
    groups: dict[tuple[int | None, int], list[int]] = {}
    host_ab = ab.tolist()
    host_labels = labels.tolist() if conditional and labels is not None else None
    for i, value in enumerate(host_ab):
        label = int(host_labels[i]) if host_labels is not None else None
        size = size_of(float(value)) if size_of is not None else 0
        groups.setdefault((label, size), []).append(i)
    return {k: torch.tensor(v, device=ab.device) for k, v in groups.items()}


class _BatchSplitMachine(Denoiser):
    """A machine that answers each (label, patch size) part of a batch separately and scatters the parts back.

    A conditional machine called with labels=None is the unconditional machine over every class's images,
    so classifier-free guidance D_u + w·(D_c − D_u) works with analytic machines as with networks.

    Subclasses give `_size_of` (None: one size), `_provenance_shape(x)` and `_part(label, size, x, ab,
    provenance) -> (x̂₀ part, provenance part with dataset-local image indices in [..., 0] | None, index map)`.
    """

    _size_of: Callable[[float], int] | None = None
    unconditional_without_labels = True

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        return self.denoise_with_provenance(x, alpha_bar, labels, provenance=False)[0]

    def _provenance_shape(self, x: Tensor) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _part(self, label: int | None, size: int | None, x: Tensor, alpha_bar: Tensor,
              provenance: bool) -> tuple[Tensor, Tensor | None, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise_with_provenance(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None = None,
                                provenance: bool = True) -> tuple[Tensor, Tensor | None]:
        """(x̂₀ [B, C, H, W], provenance whose [..., 0] is the dataset index of each arg-max source)."""
        x, alpha_bar, labels = self.validate_call(x, alpha_bar, labels)
        groups = _split_batch(alpha_bar, labels, self.conditional, self._size_of)
        prov = torch.full(self._provenance_shape(x), -1, dtype=torch.int64, device=x.device) if provenance else None
        outs, where = [], []
        for (label, size), idx in groups.items():
            out, p, index = self._part(label, size, x[idx], alpha_bar[idx], provenance)
            outs.append(out)
            where.append(idx)
            if provenance:
                p[..., 0] = index[p[..., 0].clamp_min(0)]   # subset-local image index -> dataset index
                prov[idx] = p
        if len(outs) == 1:
            return outs[0], prov
        # out of place, so that autograd follows every part back to x
        return torch.cat(outs)[torch.argsort(torch.cat(where))], prov


class PatchMachine(_BatchSplitMachine):
    """LS (grouping 'location', eq. 7–8), ELS ('shared', eq. 9–10 / 39–40) or bbELS ('border', eq. 41)."""

    def __init__(self, data: ImageSet, name: str, grouping: str, patch_size: PatchSize, padding: str,
                 conditional: bool = False, dtype: torch.dtype = torch.float32,
                 chunk_images: int | None = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                 valid_only: bool = False, cache: bool | str = "auto", topk: int = DEFAULT_TOPK,
                 patch_schedule: str = "cosine", prune: bool | str = False, cross_term: str = "auto") -> None:
        super().__init__(tuple(data.images.shape[1:]), {
            "patch_size": _jsonable_patch_size(patch_size), "padding": padding, "conditional": conditional,
            "dtype": str(dtype).replace("torch.", ""), "valid_only": valid_only})
        self.name, self.conditional = name, bool(conditional)
        self.size_of = patch_size_function(patch_size, patch_schedule)
        for size in _listed_sizes(patch_size, self.size_of):       # refuse now, not at the first call
            check_patch_fits(size, tuple(data.images.shape[1:]))
        self.dtype = dtype
        self.engines = Conditioned(data, conditional, lambda images: PatchPosterior(
            images, grouping=grouping, padding=padding, valid_only=valid_only, dtype=dtype,
            chunk_images=chunk_images, memory_budget=memory_budget, cache=cache, topk=topk, prune=prune,
            cross_term=cross_term))

    def move_state(self, device: torch.device) -> None:
        self.engines.to(device)

    def engine_log(self) -> list[dict[str, Any]]:
        entries = []
        for label, (engine, _) in self.engines.items():
            entries += [{"label": label, **e} for e in engine.history]
            engine.history = []
        return entries

    def patch_size_at(self, alpha_bar: float) -> int:
        return self.size_of(float(alpha_bar))

    def _size_of(self, alpha_bar: float) -> int:
        return self.size_of(alpha_bar)

    def denoise_sizes(self, x: Tensor, alpha_bar: Tensor | float, labels: Tensor | None,
                      sizes: Sequence[int]) -> dict[int, Tensor]:
        """{P: x̂₀ [B, C, H, W]} at the sizes of `sizes` (this machine's schedule aside) that one pass of the
        engine's multi-size route covers (`engine.multisize_route`: circular ELS, zero-padded bbELS; CPU); {} when it
        covers fewer than two, so that the caller evaluates those sizes one by one (calibration)."""
        x, ab, labels = self.validate_call(x, alpha_bar, labels)
        if self.conditional:
            return {}
        engine, _ = self.engines.get(None)
        if not isinstance(engine, PatchPosterior):
            return {}
        engine.to(x.device)
        return denoise_sizes(engine, x, ab, sizes)

    def _provenance_shape(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[0], *x.shape[2:], 3)             # (dataset image, y, x) of each pixel's arg-max patch

    def _part(self, label: int | None, size: int | None, x: Tensor, alpha_bar: Tensor,
              provenance: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        engine, index = self.engines.get(label)
        result = engine(x, alpha_bar, size, return_provenance=provenance)
        return (*result, index) if provenance else (result, None, index)


class ImageMachine(_BatchSplitMachine):
    """IS (posterior over whole training images, eq. 3–4) or ES (over all their circular translates, eq. 5)."""

    def __init__(self, data: ImageSet, name: str, translates: bool, conditional: bool = False,
                 dtype: torch.dtype = torch.float32, chunk_images: int | None = None,
                 memory_budget: float = DEFAULT_MEMORY_BUDGET, topk: int = DEFAULT_TOPK) -> None:
        super().__init__(tuple(data.images.shape[1:]), {"conditional": conditional,
                                                        "dtype": str(dtype).replace("torch.", "")})
        self.name, self.conditional, self.translates = name, bool(conditional), translates
        self.options = dict(dtype=dtype, chunk_images=chunk_images, memory_budget=memory_budget, topk=topk)
        self.images = Conditioned(data, conditional, lambda images: images)
        self.posterior = image_posterior        # the bank split over ranks swaps in its merged form (sf.distributed)
        self._log: list[dict[str, Any]] = []

    def move_state(self, device: torch.device) -> None:
        self.images.to(device)

    def engine_log(self) -> list[dict[str, Any]]:
        entries, self._log = self._log, []
        return entries

    def _provenance_shape(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[0], 3)                            # (dataset image, shift y, shift x) of the arg-max

    def _part(self, label: int | None, size: int | None, x: Tensor, alpha_bar: Tensor,
              provenance: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        images, index = self.images.get(label)
        result = self.posterior(x, alpha_bar, images, translates=self.translates,
                                 return_provenance=provenance, **self.options)
        differentiable = torch.is_grad_enabled() and x.requires_grad and not provenance
        self._log.append({"label": label, "cross_term": "image", "device": str(x.device),
                          "fold": fold_path(self.options["dtype"], x.device, differentiable),
                          "alpha_bar": alpha_bar.tolist(), "neglected_bound": 0.0})
        return (*result, index) if provenance else (result, None, index)


# ---- closed forms ----------------------------------------------------------------------------------------------

class TanhMachine(Denoiser):
    """The two-state machine: ELS on the dataset {all +1, all −1} in closed form,
    x̂₀(x) = tanh(√ᾱ·Σ_{y∈Ω_x} φ(y) / (1−ᾱ)) (EFT paper eq. 11; criticality paper eq. 9), the sum running over
    the P×P patch and all channels (zero-extended or wrapped at the border); every channel gets the same value.
    Works on any lattice size."""

    name = "tanh"

    def __init__(self, channels: int, image_size: tuple[int, int], patch_size: int, padding: str) -> None:
        super().__init__((channels, *image_size), {"patch_size": patch_size, "padding": padding})
        self.patch_size, self.padding = check_patch_size(patch_size), check_padding(padding)

    def forward(self, x: Tensor, alpha_bar: Tensor | float, labels: Tensor | None = None) -> Tensor:
        x, ab, labels = check_denoiser_inputs(x, alpha_bar, labels)   # any lattice size
        return self.denoise(x, ab, labels)

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        a, s2 = noise_coefficients(alpha_bar)
        r = self.patch_size // 2
        total = x.sum(1, keepdim=True)                                         # [B, 1, H, W]
        mode = "circular" if self.padding == "circular" else "constant"
        if self.padding == "circular" and r >= min(x.shape[-2:]):
            patch_sum = extract_patches(total, self.patch_size, "circular").sum(-1)   # wraps more than once
            patch_sum = patch_sum.reshape(total.shape)
        else:
            patch_sum = F.avg_pool2d(F.pad(total, (r, r, r, r), mode=mode), self.patch_size, stride=1,
                                     divisor_override=1)
        field = (a / s2).to(x.dtype)[:, None, None, None] * patch_sum
        return torch.tanh(field).expand_as(x).contiguous()


class DictionaryMachine(Denoiser):
    """Weighted patch-dictionary model (criticality paper App. E.4, eq. 54–57): at each site the posterior
    over dictionary patterns p_k with prior π_k, w_k ∝ π_k·N(y | √ᾱ·p_k, (1−ᾱ)I) (for ±1 patterns the norm term
    is constant and this is eq. 54), and x̂₀ = Σ_k w_k p_k(0) (eq. 56). Works on a lattice of any size."""

    name = "dictionary"

    def __init__(self, bank: CachedBank, channels: int, image_size: tuple[int, int], patch_size: int,
                 padding: str, dtype: torch.dtype, topk: int, memory_budget: float) -> None:
        super().__init__((channels, *image_size), {"patch_size": patch_size, "padding": padding,
                                                   "dtype": str(dtype).replace("torch.", "")})
        self.bank, self.patch_size, self.padding = bank, patch_size, padding
        self.dtype, self.topk, self.memory_budget = dtype, topk, memory_budget

    def move_state(self, device: torch.device) -> None:
        self.bank = self.bank.to(device)

    def forward(self, x: Tensor, alpha_bar: Tensor | float, labels: Tensor | None = None) -> Tensor:
        x, ab, labels = check_denoiser_inputs(x, alpha_bar, labels)   # any lattice size
        if x.shape[1] != self.image_shape[0]:
            raise DenoiserInputError(f"x has {x.shape[1]} channels, the dictionary {self.image_shape[0]}")
        return self.denoise(x, ab, labels)

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        a, s2 = noise_coefficients(alpha_bar)
        q = extract_patches(x.to(self.dtype), self.patch_size, self.padding).reshape(1, b * h * w, -1)
        a_q = a.repeat_interleave(h * w)[None]
        s2_q = s2.repeat_interleave(h * w)[None]
        mean, _ = softmax_posterior(q, a_q, s2_q, self.bank, dtype=self.dtype, topk=self.topk,
                                    memory_budget=self.memory_budget)
        return mean.reshape(b, h, w, c).permute(0, 3, 1, 2).to(x.dtype)


# ---- builders (the registry) ---------------------------------------------------------------------------------

def _no_patch_options(name: str, patch_size: Any, padding: Any) -> None:
    if patch_size is not None:
        raise ModelConfigError(f"{name} uses the whole image as one patch; it takes no patch_size")
    if padding not in (None, "circular") and name == "es":
        raise ModelConfigError("es uses circular translates; padding must be 'circular' (or left out)")
    if padding is not None and name == "is":
        raise ModelConfigError("is compares whole images; it takes no padding")


@register_model("is")
def build_is(data: ImageSet, patch_size: None = None, padding: None = None, conditional: bool = False,
             dtype: torch.dtype | str = torch.float32, chunk_images: int | None = None,
             memory_budget: float = DEFAULT_MEMORY_BUDGET, topk: int = DEFAULT_TOPK) -> Denoiser:
    """The ideal score machine (kamb-ganguli eq. 3–4): posterior over whole training images."""
    _no_patch_options("is", patch_size, padding)
    return ImageMachine(data, "is", False, conditional, resolve_dtype(dtype), chunk_images, memory_budget, topk)


@register_model("es")
def build_es(data: ImageSet, patch_size: None = None, padding: str | None = None, conditional: bool = False,
             dtype: torch.dtype | str = torch.float32, chunk_images: int | None = None,
             memory_budget: float = DEFAULT_MEMORY_BUDGET, topk: int = DEFAULT_TOPK) -> Denoiser:
    """The equivariant score machine (eq. 5–6): posterior over all circular translates of the training images."""
    _no_patch_options("es", patch_size, padding)
    return ImageMachine(data, "es", True, conditional, resolve_dtype(dtype), chunk_images, memory_budget, topk)


def _patch_machine(name: str, grouping: str, data: ImageSet, patch_size: PatchSize, padding: str,
                   conditional: bool, dtype: torch.dtype | str, **options: Any) -> Denoiser:
    try:
        check_padding(padding)
        return PatchMachine(data, name, grouping, patch_size, padding, conditional, resolve_dtype(dtype),
                            **options)
    except PatchConfigError as exc:
        raise ModelConfigError(f"{name}: {exc}") from exc


@register_model("ls")
def build_ls(data: ImageSet, patch_size: PatchSize = None, padding: str = "zeros", conditional: bool = False,
             dtype: torch.dtype | str = torch.float32, chunk_images: int | None = None,
             memory_budget: float = DEFAULT_MEMORY_BUDGET, cache: bool | str = "auto",
             topk: int = DEFAULT_TOPK, patch_schedule: str = "cosine") -> Denoiser:
    """The local score machine (eq. 7–8): each location's own bank of co-located training patches."""
    return _patch_machine("ls", "location", data, patch_size, padding, conditional, dtype,
                          chunk_images=chunk_images, memory_budget=memory_budget, cache=cache, topk=topk,
                          patch_schedule=patch_schedule)


@register_model("els")
def build_els(data: ImageSet, patch_size: PatchSize = None, padding: str = "circular",
              conditional: bool = False, dtype: torch.dtype | str = torch.float32,
              chunk_images: int | None = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
              valid_only: bool = False, cache: bool | str = "auto", topk: int = DEFAULT_TOPK,
              patch_schedule: str = "cosine", prune: bool | str = False, cross_term: str = "auto") -> Denoiser:
    """The equivariant local score machine (eq. 9–10 / 39–40) with periodic boundaries: one bank of all H·W
    wrapped patches of every training image (valid_only=True: patches that fit inside the image only).
    cross_term: 'auto', 'box' (every distance as a box sum, `engine.box`) or 'gemm' (see PatchPosterior)."""
    if padding == "zeros":
        raise ModelConfigError("els assumes periodic boundaries (padding='circular'); for a zero-padded "
                               "network the theory gives the boundary-broken ELS machine: use model 'bbels'")
    return _patch_machine("els", "shared", data, patch_size, padding, conditional, dtype,
                          chunk_images=chunk_images, memory_budget=memory_budget, valid_only=valid_only,
                          cache=cache, topk=topk, patch_schedule=patch_schedule, prune=prune,
                          cross_term=cross_term)


@register_model("bbels")
def build_bbels(data: ImageSet, patch_size: PatchSize = None, padding: str = "zeros",
                conditional: bool = False, dtype: torch.dtype | str = torch.float32,
                chunk_images: int | None = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                cache: bool | str = "auto", topk: int = DEFAULT_TOPK, patch_schedule: str = "cosine") -> Denoiser:
    """The boundary-broken ELS machine (eq. 41, App. B.2, Fig. 9) for zero-padded networks: each pixel uses
    the bank patches of its border class (distances to the four borders capped at (P−1)/2)."""
    if padding != "zeros":
        raise ModelConfigError("bbels models zero-padded borders (padding='zeros'); with periodic "
                               "boundaries there is no border: use model 'els'")
    return _patch_machine("bbels", "border", data, patch_size, padding, conditional, dtype,
                          chunk_images=chunk_images, memory_budget=memory_budget, cache=cache, topk=topk,
                          patch_schedule=patch_schedule)


@register_model("tanh")
def build_tanh(data: ImageSet, patch_size: int = 3, padding: str = "circular", conditional: bool = False,
               dtype: Any = None) -> Denoiser:
    """The closed-form two-state machine (EFT eq. 11, criticality eq. 9); `data` only sets channels and size."""
    if conditional:
        raise ModelConfigError("tanh is the closed form of a fixed two-image dataset; it has no classes")
    try:
        return TanhMachine(data.channels, (data.height, data.width), check_patch_size(patch_size),
                           check_padding(padding))
    except PatchConfigError as exc:
        raise ModelConfigError(f"tanh: {exc}") from exc


@register_model("dictionary")
def build_dictionary(data: ImageSet, patch_size: int | None = None, padding: str = "circular",
                     patterns: Tensor | None = None, priors: Tensor | None = None, conditional: bool = False,
                     dtype: torch.dtype | str = torch.float32, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                     topk: int = DEFAULT_TOPK) -> Denoiser:
    """Weighted patch-dictionary model (criticality App. E.4). patterns: [K, P, P] or [K, C, P, P]; priors: [K]
    (positive, any normalization; default uniform). Without patterns, the dictionary is the data's distinct
    patches (periodic), each with prior ∝ its count — then the machine is the ELS machine on any lattice."""
    if conditional:
        raise ModelConfigError("dictionary has no class-conditional form")
    dtype = resolve_dtype(dtype)
    try:
        padding = check_padding(padding)
        if patterns is None:
            if priors is not None:
                raise ModelConfigError("priors given without patterns")
            size = check_patch_size(5 if patch_size is None else patch_size)
            gb = group_layout("shared", data.height, data.width, size)[0]
            bank = build_cached_bank(StreamedPatches(
                data.images, torch.zeros(len(data), device=data.images.device), size, padding, gb.key_locs))
            channels = data.channels
        else:
            bank, channels, size = _dictionary_bank(patterns, priors, patch_size)
    except PatchConfigError as exc:
        raise ModelConfigError(f"dictionary: {exc}") from exc
    return DictionaryMachine(bank, channels, (data.height, data.width), size, padding, dtype, topk,
                             memory_budget)


def _dictionary_bank(patterns: Tensor, priors: Tensor | None,
                     patch_size: int | None) -> tuple[CachedBank, int, int]:
    pats = torch.as_tensor(patterns, dtype=torch.float32)
    if pats.ndim == 3:
        pats = pats[:, None]
    if pats.ndim != 4 or pats.shape[-1] != pats.shape[-2] or pats.shape[0] == 0:
        raise ModelConfigError(f"patterns must be [K, P, P] or [K, C, P, P], got {tuple(pats.shape)}")
    k, c, size = pats.shape[0], pats.shape[1], check_patch_size(pats.shape[-1])
    if patch_size is not None and patch_size != size:
        raise ModelConfigError(f"patch_size={patch_size} disagrees with the {size}×{size} patterns")
    pri = (torch.full((k,), 1.0 / k, dtype=torch.float64, device=pats.device) if priors is None
           else torch.as_tensor(priors, dtype=torch.float64, device=pats.device))
    if pri.shape != (k,) or not (pri > 0).all() or not torch.isfinite(pri).all():
        raise ModelConfigError(f"priors must be [K]=[{k}] positive numbers, got {pri.tolist()}")
    keys = pats.reshape(1, k, -1)
    sources = torch.stack([torch.arange(k, device=pats.device), torch.zeros(k, dtype=torch.int64, device=pats.device),
                           torch.zeros(k, dtype=torch.int64, device=pats.device)], -1)[None]
    bank = CachedBank(keys, torch.log(pri).to(torch.float32)[None], keys[..., centre_columns(c, size)], sources)
    return bank, c, size
