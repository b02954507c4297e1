"""The compiled CPU fast path of `kernels.accumulate` (source: `engine/csrc/patch_softmax.cpp`).

Built, cached and self-checked by `build` (-O3 -march=native -fopenmp). Whenever it cannot be used (no
compiler, failed build or check, float64, a non-CPU device, autograd, shapes it does not cover)
`try_accumulate` returns None and the caller falls back to the pure-torch reference of `softmax`.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .build import CSRC, CompiledKernel
from .softmax import accumulate_reference, init_state

Tensor = torch.Tensor

SOURCE = CSRC / "patch_softmax.cpp"
MAX_VALUE_DIM = 4
# Up to this patch dimension the kernel's own register-blocked logits (6 query rows x 16 keys in registers, the
# bias and the row max folded in as they are stored) beat a BLAS call per tile, which writes a score tile that
# then needs a separate max pass.
DIRECT_MAX_DIM = 64
# Query rows x keys per score tile (96 KiB, 256 KiB or 512 KiB of float32: stays in L2). The direct path runs
# at the same speed for 48-256 rows and small blocks balance the threads; large D wants more query rows per
# tile so that each BLAS call is big enough to run near peak.
BLOCK_Q_DIRECT, BLOCK_Q, BLOCK_Q_LARGE_D, BLOCK_K = 48, 128, 256, 512
LARGE_D = 64
KEY_PANEL = 16  # keys per packed panel of the direct path (BLOCK_K is a multiple of it)


@functools.cache
def _sgemm_address() -> int | None:
    """Address of the Fortran sgemm_ that torch's own BLAS exports, if any (used for large D)."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = lib_dir / name
        if path.exists():
            try:
                return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sf_accumulate.restype = ctypes.c_int
    lib.sf_accumulate.argtypes = ([i64] * 5 + [ptr, i64] * 6 + [ptr] * 3 + [i64, ptr, ptr, i64, i64, i64]
                                  + [ctypes.c_int, ptr])


def available() -> bool:
    """True when the compiled kernel is built, loaded and agrees with the reference."""
    return _KERNEL.available()


def _self_check() -> bool:
    """The kernel against the reference on every branch it can take: the direct path (D ≤ 64) and the BLAS path,
    each value dim 1..4, every remainder of the 6-row register block, a padded last key panel, two key tiles
    (the running state rescaled between them) and top-k tracking on and off. Runs `_accumulate`, not
    `try_accumulate`: the kernel is not yet `available()` while it is being checked."""
    gen = torch.Generator().manual_seed(0)
    cases = [(dim, n_values) for dim in (9, DIRECT_MAX_DIM + 9) for n_values in range(1, MAX_VALUE_DIM + 1)]
    for case, (dim, n_values) in enumerate(cases):
        n_q, n_k, topk = 31 + case, BLOCK_K + 19, 4 * (n_values % 2)   # 31..38 rows: remainders 1..5 and 0
        q = torch.randn(n_q, dim, generator=gen)
        k = torch.randn(n_k, dim, generator=gen)
        b = torch.randn(n_k, generator=gen)
        v = torch.randn(n_k, n_values, generator=gen)
        start = init_state((n_q,), n_values, topk=topk)
        ref = accumulate_reference(start, q, k, b, v, 0.3, key_offset=5)
        got = _accumulate(start, q, k, b, v, 0.3, key_offset=5)
        if got is None or not torch.allclose(got.acc / got.l[:, None], ref.acc / ref.l[:, None], atol=1e-5):
            return False
        if topk and not torch.equal(got.topk_index, ref.topk_index):
            return False
    return True


def _group_view(t: Tensor, lead: tuple[int, ...], tail: int, groups: int) -> tuple[Tensor, int]:
    """t: [lead'..., *tail dims] -> ([G or 1, ...] contiguous float32, per-group stride in elements)."""
    own = tuple(t.shape[: t.ndim - tail])
    inner = tuple(t.shape[t.ndim - tail:])
    if all(s == 1 for s in own):
        return t.reshape(1, *inner).contiguous(), 0
    if own != lead:
        t = t.expand(*lead, *inner)
    t = t.reshape(groups, *inner).contiguous()
    return t, t[0].numel()


def _scale_vector(scale: float | Tensor, queries: Tensor, lead: tuple[int, ...], groups: int) -> Tensor | None:
    """The scale as [G] (or [1] when shared), or None for shapes the compiled path does not cover."""
    if not isinstance(scale, Tensor):
        return torch.tensor([float(scale)], dtype=torch.float32)
    if scale.ndim == 0 or scale.numel() == 1:
        return scale.detach().reshape(1).to(device="cpu", dtype=torch.float32)
    if scale.ndim == queries.ndim - 2:  # one scale per group, as `kernels.logits` reads it
        return scale.detach().expand(lead).reshape(groups).to(dtype=torch.float32).contiguous()
    return None


def try_accumulate(state, queries: Tensor, keys: Tensor, bias: Tensor, values: Tensor,
                   scale: float | Tensor, key_offset: int = 0):
    """The compiled `accumulate`, or None when it does not apply (the caller then uses the reference).

    dtype, device and autograd are checked before `available()`: float64 work never triggers a compile."""
    tensors = [queries, keys, bias, values, state.m, state.l, state.acc]
    if isinstance(scale, Tensor):
        tensors.append(scale)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad for t in tensors):
        return None
    if not _KERNEL.available():
        return None
    return _accumulate(state, queries, keys, bias, values, scale, key_offset)


def _accumulate(state, queries: Tensor, keys: Tensor, bias: Tensor, values: Tensor, scale: float | Tensor,
                key_offset: int):
    """The library call of `try_accumulate` on float32 CPU tensors, or None for shapes it does not cover."""
    n_keys, dim, n_values = keys.shape[-2], queries.shape[-1], values.shape[-1]
    if not (0 < n_values <= MAX_VALUE_DIM) or keys.shape[-1] != dim or n_keys == 0:
        return None
    try:
        lead = tuple(torch.broadcast_shapes(queries.shape[:-2], keys.shape[:-2], bias.shape[:-1],
                                            values.shape[:-2]))
    except RuntimeError:
        return None
    if tuple(queries.shape[:-2]) != lead or tuple(state.m.shape) != (*lead, queries.shape[-2]):
        return None
    groups = int(torch.Size(lead).numel())
    scale_g = _scale_vector(scale, queries, lead, groups)
    if scale_g is None or n_keys >= 2**31 or dim >= 2**31:
        return None
    n_q = queries.shape[-2]
    q = queries.reshape(groups, n_q, dim).contiguous()
    k, k_gs = _group_view(keys, lead, 2, groups)
    b, b_gs = _group_view(bias, lead, 1, groups)
    v, _ = _group_view(values, lead, 2, groups)
    v_t = v.transpose(-1, -2).contiguous()                     # [G or 1, V, K]
    v_gs = v_t[0].numel() if v_t.shape[0] > 1 else 0
    sgemm = _sgemm_address()
    use_blas = sgemm is not None and dim > DIRECT_MAX_DIM
    k_p = None if use_blas else _key_panels(k)                   # [G or 1, ceil(K / 16), D, 16]
    m = state.m.reshape(groups, n_q).clone()
    l = state.l.reshape(groups, n_q).clone()
    acc = state.acc.reshape(groups, n_q, n_values).clone()
    topk = 0 if state.topk_logit is None else state.topk_logit.shape[-1]
    tk_logit = tk_index = None
    if topk:
        tk_logit = state.topk_logit.reshape(groups, n_q, topk).to(torch.float32).clone()
        tk_index = state.topk_index.reshape(groups, n_q, topk).to(torch.int64).clone()
    ptr = _pointer
    code = _KERNEL.library.sf_accumulate(
        groups, n_q, n_keys, dim, n_values,
        ptr(q), n_q * dim, ptr(k), k_gs, ptr(k_p), k_p[0].numel() if k_p is not None and k_gs else 0,
        ptr(b), b_gs, ptr(v_t), v_gs, ptr(scale_g), 1 if scale_g.numel() > 1 else 0,
        ptr(m), ptr(l), ptr(acc), topk, ptr(tk_logit), ptr(tk_index), int(key_offset),
        _block_q(dim, use_blas), BLOCK_K, torch.get_num_threads(), sgemm if use_blas else None)
    if code != 0:
        return None
    out = type(state)(m.reshape(state.m.shape), l.reshape(state.l.shape), acc.reshape(state.acc.shape))
    if topk:
        out.topk_logit = tk_logit.reshape(state.topk_logit.shape)
        out.topk_index = tk_index.reshape(state.topk_index.shape)
    return out


def _key_panels(keys: Tensor) -> Tensor:
    """keys [G, K, D] -> [G, ceil(K / 16), D, 16], zero-padded: 16 keys of one dimension lie side by side."""
    groups, n_keys, dim = keys.shape
    padded = torch.nn.functional.pad(keys, (0, 0, 0, -n_keys % KEY_PANEL))
    return padded.reshape(groups, -1, KEY_PANEL, dim).transpose(-1, -2).contiguous()


def _block_q(dim: int, use_blas: bool) -> int:
    if not use_blas:
        return BLOCK_Q_DIRECT
    return BLOCK_Q_LARGE_D if dim > LARGE_D else BLOCK_Q


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_KERNEL = CompiledKernel(SOURCE, _declare, "patch kernel", "pure torch", _self_check)
