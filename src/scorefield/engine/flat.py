"""The flat first steps: when every logit equals its log-weight to within FLAT_LOGIT_SPREAD (pure noise), the
patch posterior is the bank's prior mean Σ_k w_k v_k / Σ_k w_k, computed once per bank instead of folded."""
from __future__ import annotations

import math

import torch

from . import kernels
from .banks import ASSIGN_CHUNK_KEYS, KeySource

Tensor = torch.Tensor

FLAT_LOGIT_SPREAD = 1e-9                 # below this logit spread the posterior is the bank's prior mean


def flat_logit_spread(q: Tensor, a: Tensor, s2: Tensor, max_pixel: float) -> float:
    """max over queries and keys of |(a/s²)·q·k − (a²/2s²)‖k‖²|, bounded with ‖k‖ ≤ √D·max|pixel|.

    q: [G, Q, D]; a, s2: [G, Q] (float64)."""
    k_max = math.sqrt(q.shape[-1]) * max_pixel
    q_norm = q.detach().double().norm(dim=-1)                                     # [G, Q]
    return float(((a / s2) * q_norm * k_max + (a * a) / (2 * s2) * k_max**2).max())


def circular_prior_mean(images: Tensor, log_weights: Tensor, dtype: torch.dtype) -> Tensor:
    """[1, C]: the prior mean of the shared circular bank of all H·W patches. Every pixel of every image is the
    centre of exactly one of its patches, so it is the log-weighted mean of the images' mean pixels, O(N·H·W)."""
    weights = torch.softmax(log_weights.to(torch.float64), 0)                      # [N]
    pixel_means = images.to(torch.float64).mean(dim=(2, 3))                        # [N, C]
    return (weights @ pixel_means)[None].to(dtype)


def bank_prior_mean(source: KeySource, dtype: torch.dtype) -> Tensor:
    """[G, V]: Σ_k w_k v_k / Σ_k w_k of any bank, folded once in float64 with a zero query."""
    source.set_chunk_keys(min(source.num_keys, ASSIGN_CHUNK_KEYS))
    state = kernels.init_state((source.groups, 1), source.value_dim, torch.float64, source.device)
    zero = torch.zeros(source.groups, 1, source.dim + 1, dtype=torch.float64, device=source.device)
    for _, k_aug, logw, values in source.augmented_chunks(torch.float64):
        state = kernels.accumulate_reference(state, zero, k_aug, logw, values, 1.0)
    return kernels.finalize(state)[:, 0].to(dtype)
