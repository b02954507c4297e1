"""The streaming softmax-weighted mean at the heart of every patch machine: the pure-torch reference.

For query rows q_i and bank keys k_j with values v_j, the logits are
    ℓ_ij = scale · q_i·k_j + bias_j                              (an attention score with a per-key bias)
and the output is Σ_j softmax_j(ℓ_ij) v_j. It is computed by an exact streaming log-sum-exp: one running
max m_i, running weight sum l_i and running weighted sum acc_i per query row, updated chunk by chunk of
keys, so no full [Q, K] matrix is ever held. States merge associatively (`merge`), so the same operation
combines chunks, threads, devices and processes.

Every tensor may carry leading group dimensions G... (e.g. one bank per image location for the LS machine):
queries [G..., Q, D], keys [G..., K, D], bias [G..., K], values [G..., K, V].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# exp of logits below this (relative to the running max) underflows to 0 in float32 anyway; clamping keeps
# torch.exp off its slow denormal path.
LOGIT_FLOOR = -80.0


@dataclass
class SoftmaxState:
    """Running statistics of a streaming softmax for each query row.

    m: [G..., Q] running max logit; l: [G..., Q] Σ exp(ℓ − m); acc: [G..., Q, V] Σ exp(ℓ − m)·v;
    topk_logit / topk_index: [G..., Q, k] the k largest logits seen and their global key indices
    (only when tracking was requested; used to recompute the dominant keys exactly).
    """

    m: Tensor
    l: Tensor
    acc: Tensor
    topk_logit: Tensor | None = None
    topk_index: Tensor | None = None


def init_state(shape: tuple[int, ...], value_dim: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", topk: int = 0) -> SoftmaxState:
    """An empty state for queries of leading shape `shape` = (G..., Q)."""
    m = torch.full(shape, -torch.inf, dtype=dtype, device=device)
    l = torch.zeros(shape, dtype=dtype, device=device)
    acc = torch.zeros((*shape, value_dim), dtype=dtype, device=device)
    if topk > 0:
        return SoftmaxState(m, l, acc, torch.full((*shape, topk), -torch.inf, dtype=dtype, device=device),
                            torch.full((*shape, topk), -1, dtype=torch.int64, device=device))
    return SoftmaxState(m, l, acc)


def logits(queries: Tensor, keys: Tensor, bias: Tensor, scale: float | Tensor) -> Tensor:
    """ℓ = scale · q·k + bias: [G..., Q, K] from queries [G..., Q, D], keys [G..., K, D], bias [G..., K]."""
    scale = torch.as_tensor(scale, dtype=queries.dtype, device=queries.device)
    if scale.ndim:
        scale = scale[..., None, None] if scale.ndim == queries.ndim - 2 else scale
    return torch.matmul(queries, keys.transpose(-1, -2)) * scale + bias.unsqueeze(-2)


def accumulate_reference(state: SoftmaxState, queries: Tensor, keys: Tensor, bias: Tensor, values: Tensor,
                         scale: float | Tensor, key_offset: int = 0) -> SoftmaxState:
    """Fold one chunk of keys into `state` (pure torch; the oracle for every faster path).

    queries: [G..., Q, D]; keys: [G..., K, D]; bias: [G..., K]; values: [G..., K, V];
    key_offset: global index of this chunk's first key (for top-k tracking).
    """
    if keys.shape[-2] == 0:
        return state
    lg = logits(queries, keys, bias, scale)                      # [G..., Q, K]
    chunk_max = lg.amax(dim=-1)                                   # [G..., Q]
    m_new = torch.maximum(state.m, chunk_max)
    rescale = torch.exp(state.m - m_new)                          # exp(-inf) = 0 for an empty state
    w = torch.exp((lg - m_new.unsqueeze(-1)).clamp_min(LOGIT_FLOOR))
    l_new = state.l * rescale + w.sum(dim=-1)
    acc_new = state.acc * rescale.unsqueeze(-1) + torch.matmul(w, values)
    out = SoftmaxState(m_new, l_new, acc_new)
    if state.topk_logit is not None:
        k = state.topk_logit.shape[-1]
        idx = torch.arange(key_offset, key_offset + lg.shape[-1], device=lg.device).expand(lg.shape)
        cand_logit = torch.cat([state.topk_logit, lg], dim=-1)
        cand_index = torch.cat([state.topk_index, idx], dim=-1)
        top = cand_logit.topk(min(k, cand_logit.shape[-1]), dim=-1)
        out.topk_logit = top.values
        out.topk_index = torch.gather(cand_index, -1, top.indices)
    return out


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Combine two partial states over disjoint key sets (associative and commutative)."""
    m = torch.maximum(a.m, b.m)
    finite = torch.isfinite(m)
    ra = torch.where(finite, torch.exp(a.m - m), torch.zeros_like(m))
    rb = torch.where(finite, torch.exp(b.m - m), torch.zeros_like(m))
    out = SoftmaxState(m, a.l * ra + b.l * rb, a.acc * ra.unsqueeze(-1) + b.acc * rb.unsqueeze(-1))
    if a.topk_logit is not None and b.topk_logit is not None:
        k = a.topk_logit.shape[-1]
        cand_logit = torch.cat([a.topk_logit, b.topk_logit], dim=-1)
        cand_index = torch.cat([a.topk_index, b.topk_index], dim=-1)
        top = cand_logit.topk(k, dim=-1)
        out.topk_logit, out.topk_index = top.values, torch.gather(cand_index, -1, top.indices)
    return out


def finalize(state: SoftmaxState) -> Tensor:
    """The softmax-weighted mean Σ_j softmax_j v_j: [G..., Q, V]."""
    return state.acc / state.l.unsqueeze(-1)
