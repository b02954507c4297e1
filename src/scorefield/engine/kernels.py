"""`accumulate`: the one entry point of the streaming softmax (`softmax`), served by the compiled kernel
(`fused`) where it applies and by the pure-torch reference everywhere else."""
from __future__ import annotations

import torch

from . import fused
from .softmax import (
    LOGIT_FLOOR,
    SoftmaxState,
    accumulate_reference,
    finalize,
    init_state,
    logits,
    merge,
)

__all__ = ["LOGIT_FLOOR", "SoftmaxState", "accumulate", "accumulate_reference", "finalize", "init_state",
           "logits", "merge"]

Tensor = torch.Tensor
HOST = torch.device("cpu")


def accumulate(state: SoftmaxState, queries: Tensor, keys: Tensor, bias: Tensor, values: Tensor,
               scale: float | Tensor, key_offset: int = 0) -> SoftmaxState:
    """Fold one chunk of keys into `state`: the entry point the engine calls.

    Same arguments, shapes and result as `accumulate_reference`. float32 work on the CPU runs in the compiled
    fused kernel (`fused`: for D ≤ 64 a register-blocked dot product that adds the bias and takes each
    row's max as the logits leave the registers, for larger D a tiled sgemm and a max pass; then one exp + sum +
    weighted-sum sweep per score row, with top-k offers, while the tile is in cache); everything else
    (float64, other devices, autograd, value dims > 4,
    scale shapes other than scalar or per-group) runs the pure-torch reference.
    """
    if keys.shape[-2] == 0:
        return state
    if queries.device.type != "cpu":
        return accumulate_reference(state, queries, keys, bias, values, scale, key_offset)
    with HOST:   # the compiled kernel's own tensors are host memory, whatever the default device
        fast = fused.try_accumulate(state, queries, keys, bias, values, scale, key_offset)
    if fast is not None:
        return fast
    return accumulate_reference(state, queries, keys, bias, values, scale, key_offset)

