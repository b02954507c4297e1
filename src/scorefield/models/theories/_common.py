"""What the theories share: the IS posterior with a temperature, class conditioning and batch splitting, and
content-derived per-sample random generators.

Every posterior of the theories is folded by the engine (`engine.softmax_posterior` or `engine.kernels`, the
streaming log-sum-exp): the theories only choose keys, values, logits and noise coefficients.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch

from ...data import ImageSet
from ...engine import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TOPK,
    WholeImages,
    image_posterior,
    noise_coefficients,
    softmax_posterior,
)
from ...engine.posterior import differentiable_posterior
from ..base import Denoiser
from ..machines import Conditioned
from ..registry import ModelConfigError

Tensor = torch.Tensor


# ---- the IS posterior with a temperature -----------------------------------------------------------------------

def image_mean(x: Tensor, alpha_bar: Tensor, images: Tensor, *, temperature: float = 1.0,
               dtype: torch.dtype = torch.float32, topk: int = DEFAULT_TOPK,
               memory_budget: float = DEFAULT_MEMORY_BUDGET) -> Tensor:
    """The IS posterior mean (kamb-ganguli eq. 3–4) of x [B, C, H, W] at ᾱ [B] over images [N, C, H, W], with
    logits divided by `temperature` (the analytic-diffusion-studio's option; 1 is the ideal denoiser, and
    then this is exactly `engine.image_posterior`)."""
    if temperature == 1.0:
        return image_posterior(x, alpha_bar, images, dtype=dtype, topk=topk, memory_budget=memory_budget)
    b = x.shape[0]
    source = WholeImages(images.detach().to(device=x.device, dtype=torch.float32),
                         torch.zeros(images.shape[0], dtype=torch.float64, device=x.device))
    a, s2 = noise_coefficients(torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1))
    s2 = s2 * temperature
    if torch.is_grad_enabled() and x.requires_grad:
        mean = differentiable_posterior(x.reshape(1, b, -1).to(torch.float64), a[None], s2[None], source,
                                        memory_budget=memory_budget)
    else:
        mean, _ = softmax_posterior(x.detach().reshape(1, b, -1).to(dtype), a[None], s2[None], source,
                                    dtype=dtype, topk=topk, memory_budget=memory_budget)
    return mean.reshape(x.shape).to(x.dtype)


def check_temperature(temperature: Any) -> float:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ModelConfigError(f"temperature must be a positive number, got {temperature!r}")
    return float(temperature)


# ---- conditioning and batch splitting ---------------------------------------------------------------------------

def split_batch(keys: list) -> dict[Any, list[int]]:
    """Sample indices grouped by key, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def scatter_parts(outs: list[Tensor], where: list[Tensor]) -> Tensor:
    """Reassemble per-group outputs into batch order (out of place, so autograd follows every part)."""
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs)[torch.argsort(torch.cat(where))]


class TheoryMachine(Denoiser):
    """A theory built per class: `bank(label)` is what `build(images)` made of that class's training images
    (all images for labels=None: a conditional theory called without labels is the unconditional one, so
    classifier-free guidance works as with networks). Subclasses implement `_part(bank, x, ᾱ)` for a batch
    of one label."""

    unconditional_without_labels = True

    def __init__(self, data: ImageSet, name: str, conditional: bool, build: Callable[[Tensor], Any],
                 config: dict[str, Any]) -> None:
        super().__init__(tuple(data.images.shape[1:]), {**config, "conditional": bool(conditional)})
        self.name, self.conditional = name, bool(conditional)
        self.banks = Conditioned(data, conditional, build)
        self._log: list[dict[str, Any]] = []

    def move_state(self, device: torch.device) -> None:
        self.banks.to(device)

    def engine_log(self) -> list[dict[str, Any]]:
        entries, self._log = self._log, []
        return entries

    def bank(self, label: int | None) -> Any:
        return self.banks.get(label)[0]

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        keys = labels.tolist() if self.conditional and labels is not None else [None] * x.shape[0]
        outs, where = [], []
        for label, rows in split_batch(keys).items():
            idx = torch.tensor(rows, device=x.device)
            part = x if len(rows) == x.shape[0] else x[idx]
            self._current_rows = idx                  # where this part sits in the batch (for per-sample stats)
            outs.append(self._part(self.bank(label), part, alpha_bar[idx], label))
            where.append(idx)
        return scatter_parts(outs, where)

    def _part(self, bank: Any, x: Tensor, alpha_bar: Tensor, label: int | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# ---- per-sample randomness ---------------------------------------------------------------------------------------

def sample_generators(x: Tensor, alpha_bar: Tensor, seed: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by a hash of (seed, the sample's float32 pixels, its ᾱ): a
    sample's random draws depend on nothing else (not on the batch it came in, its position, or the device),
    and the same input always gets the same draws, so the theory is a deterministic function of its input."""
    pixels = x.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
    ab = alpha_bar.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    gens = []
    for b in range(x.shape[0]):
        h = hashlib.blake2b(digest_size=8)
        h.update(int(seed).to_bytes(8, "little", signed=True))
        h.update(pixels[b].tobytes())
        h.update(ab[b].tobytes())
        gens.append(torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & (2**63 - 1)))
    return gens
