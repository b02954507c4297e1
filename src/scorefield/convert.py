"""Conversions between a denoiser's x̂₀ and the noise estimate ε̂, the score and the probability-flow drift.

With x = √ᾱ·x₀ + √(1−ᾱ)·ε (kamb-ganguli eq. 20):
    ε̂ = (x − √ᾱ x̂₀)/√(1−ᾱ),  score s = −ε̂/√(1−ᾱ) = (√ᾱ x̂₀ − x)/(1−ᾱ)   (Tweedie, eq. 23–24)
    probability-flow drift v = −γ_t (x + s)                                 (eq. 19)
All functions take ᾱ as [B] (or a scalar) and broadcast it over [B, C, H, W].
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def eps_from_x0(x: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """ε̂ = (x − √ᾱ x̂₀)/√(1−ᾱ); x, x0: [B, C, H, W]."""
    ab = _per_sample(alpha_bar, x)
    return (x - ab.sqrt() * x0) / (1 - ab).clamp_min(1e-20).sqrt()


def x0_from_eps(x: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ; x, eps: [B, C, H, W]."""
    ab = _per_sample(alpha_bar, x)
    return (x - (1 - ab).sqrt() * eps) / ab.clamp_min(1e-20).sqrt()


def score_from_x0(x: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """s = (√ᾱ x̂₀ − x)/(1−ᾱ) (kamb-ganguli eq. 23)."""
    ab = _per_sample(alpha_bar, x)
    return (ab.sqrt() * x0 - x) / (1 - ab).clamp_min(1e-20)


def x0_from_score(x: Tensor, score: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """x̂₀ = (x + (1−ᾱ) s)/√ᾱ."""
    ab = _per_sample(alpha_bar, x)
    return (x + (1 - ab) * score) / ab.clamp_min(1e-20).sqrt()


def drift_from_x0(x: Tensor, x0: Tensor, alpha_bar: Tensor | float, gamma: Tensor | float) -> Tensor:
    """Probability-flow velocity v = −γ_t (x + s) (kamb-ganguli eq. 19), with s from x̂₀."""
    g = _per_sample(gamma, x)
    return -g * (x + score_from_x0(x, x0, alpha_bar))
