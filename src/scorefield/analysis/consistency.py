"""Local consistency of final samples (kamb-ganguli Theorem 4.1, App. B.4) and the Fig. 3 two-image check.

A sample φ is a locally consistent point of an LS / ELS / bbELS machine when every pixel equals the centre
pixel of the L2-nearest patch of its own bank. That nearest-patch centre is exactly the machine's posterior
mean at ᾱ = 1 (s² → 0 sends the softmax to its arg-max), so the check is φ(x) ≈ model(φ, ᾱ = 1)(x).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class ConsistencyReport:
    """fraction: share of consistent pixels; consistent: [N, H, W] bool; nearest_centre: [N, C, H, W];
    deviation: [N, H, W] max over channels of |φ(x) − nearest centre|."""

    fraction: float
    consistent: Tensor
    nearest_centre: Tensor
    deviation: Tensor


def local_consistency(samples: Tensor, model: torch.nn.Module, labels: Tensor | None = None,
                      tol: float = 0.05) -> ConsistencyReport:
    """Theorem 4.1 check of samples [N, C, H, W] for a patch machine (its bank at ᾱ = 1: with a patch-size
    schedule, the lowest-noise size). A pixel is consistent when |φ(x) − ϕ*(0)| ≤ tol in every channel."""
    if samples.ndim != 4:
        raise ValueError(f"samples must be [N, C, H, W], got {tuple(samples.shape)}")
    centre = model(samples, torch.ones(samples.shape[0], dtype=samples.dtype), labels)
    deviation = (samples - centre).abs().amax(1)
    consistent = deviation <= tol
    return ConsistencyReport(consistent.float().mean().item(), consistent, centre, deviation)


def two_state_consistency(samples: Tensor, patch_size: int = 3, tol: float = 1e-3) -> Tensor:
    """Fig. 3 rule for the all-black / all-white training set with periodic boundaries: a pixel is consistent
    when it is ±1 (within tol) and the majority sign of its P×P patch equals its own sign. Returns [N, H, W]."""
    r = patch_size // 2
    total = samples.sum(1, keepdim=True)
    patch_sum = F.avg_pool2d(F.pad(total, (r, r, r, r), mode="circular"), patch_size, stride=1,
                             divisor_override=1)[:, 0]
    binary = ((samples.abs() - 1).abs() <= tol).all(1)
    return binary & (torch.sign(patch_sum) == torch.sign(samples[:, 0]))


def fig3_experiment(size: int = 16, n: int = 8, steps: tuple[int, ...] = (20, 100), patch_size: int = 3,
                    seed: int = 0) -> dict[int, dict[str, float]]:
    """The Fig. 3 experiment: ELS with periodic 3×3 patches on {all −1, all +1}, DDIM on the cosine schedule;
    for each step count, how many pixels break the local-consistency rule (summed over n samples)."""
    from .. import data as sf_data
    from .. import models, sampling

    dataset = sf_data.ImageSet(torch.stack([torch.ones(1, size, size), -torch.ones(1, size, size)]),
                               name="two-state")
    model = models.make("els", dataset, patch_size=patch_size, padding="circular")
    noise = sampling.initial_noise(n, (1, size, size), seed=seed)
    result = {}
    for k in steps:
        out = sampling.sample(model, noise, steps=k, sampler="ddim", schedule="cosine")
        ok = two_state_consistency(out, patch_size)
        result[k] = {"broken_pixels": int((~ok).sum()), "pixels": ok.numel(),
                     "broken_samples": int((~ok).flatten(1).any(1).sum()), "samples": n}
    return result
