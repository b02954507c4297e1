"""The streaming patch-posterior kernel: the fast path against the pure-torch oracle, and merge algebra."""
from __future__ import annotations

import functools
import shutil

import pytest
import torch

from scorefield.engine import build, kernels
from scorefield.engine import fused as fastkernel
from scorefield.engine.kernels import accumulate, accumulate_reference, finalize, init_state, merge

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler for the fast path")


def _problem(gen: torch.Generator, lead: tuple[int, ...], n_q: int, n_k: int, dim: int, n_v: int,
             dtype: torch.dtype = torch.float32):
    queries = torch.randn(*lead, n_q, dim, generator=gen, dtype=dtype)   # [G..., Q, D]
    keys = torch.randn(*lead, n_k, dim, generator=gen, dtype=dtype)      # [G..., K, D]
    bias = torch.randn(*lead, n_k, generator=gen, dtype=dtype) * 2       # [G..., K]
    values = torch.randn(*lead, n_k, n_v, generator=gen, dtype=dtype)    # [G..., K, V]
    return queries, keys, bias, values


def _fold(fn, state, queries, keys, bias, values, scale, chunks):
    """Fold the keys chunk by chunk (uneven chunk sizes) with `fn`."""
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        state = fn(state, queries, keys[..., sl, :], bias[..., sl], values[..., sl, :], scale, key_offset=start)
        start += size
    return state


def _assert_close_states(got, ref, atol=2e-5):
    torch.testing.assert_close(got.m, ref.m, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(finalize(got), finalize(ref), rtol=1e-4, atol=atol)


@needs_compiler
def test_compiled_kernel_is_available_here():
    assert fastkernel.available()


@needs_compiler
@pytest.mark.parametrize("dim", [1, 9, 27, 49])
@pytest.mark.parametrize("n_values", [1, 3])
def test_fast_path_matches_reference_over_uneven_chunks(dim, n_values):
    gen = torch.Generator().manual_seed(dim * 10 + n_values)
    queries, keys, bias, values = _problem(gen, (), 45, 1350, dim, n_values)
    chunks = [1, 7, 300, 1029, 13]
    scale = 0.7 / dim**0.5
    start = init_state((45,), n_values)
    ref = _fold(accumulate_reference, start, queries, keys, bias, values, scale, chunks)
    got = _fold(accumulate, start, queries, keys, bias, values, scale, chunks)
    # the fast path really ran (not the fallback)
    assert fastkernel.try_accumulate(start, queries, keys, bias, values, scale) is not None
    _assert_close_states(got, ref)
    torch.testing.assert_close(got.l / ref.l, torch.ones_like(ref.l), rtol=1e-4, atol=0)


@needs_compiler
def test_group_dims_with_per_group_scale_and_shared_keys():
    gen = torch.Generator().manual_seed(1)
    queries, keys, bias, values = _problem(gen, (2, 3), 17, 200, 25, 3)
    scale = torch.rand(2, 3, generator=gen) + 0.1                       # one scale per group [G...]
    start = init_state((2, 3, 17), 3)
    ref = accumulate_reference(start, queries, keys, bias, values, scale)
    got = fastkernel.try_accumulate(start, queries, keys, bias, values, scale)
    assert got is not None
    _assert_close_states(got, ref)
    # a bank shared by every group, with a per-group bias (one bias per sample's noise level)
    shared_keys, shared_values = keys[0, 0], values[0, 0]                # [K, D], [K, V]
    ref = accumulate_reference(start, queries, shared_keys, bias, shared_values, scale)
    got = fastkernel.try_accumulate(start, queries, shared_keys, bias, shared_values, scale)
    assert got is not None
    _assert_close_states(got, ref)


@needs_compiler
@pytest.mark.parametrize("dim", [9, 49])
def test_topk_tracking_matches_reference(dim):
    gen = torch.Generator().manual_seed(dim)
    queries, keys, bias, values = _problem(gen, (3,), 20, 700, dim, 1)
    start = init_state((3, 20), 1, topk=8)
    chunks = [5, 3, 400, 292]
    ref = _fold(accumulate_reference, start, queries, keys, bias, values, 0.5, chunks)
    got = _fold(accumulate, start, queries, keys, bias, values, 0.5, chunks)
    assert torch.equal(got.topk_index, ref.topk_index)
    torch.testing.assert_close(got.topk_logit, ref.topk_logit, rtol=1e-5, atol=1e-4)
    _assert_close_states(got, ref)


@needs_compiler
def test_extreme_logits():
    gen = torch.Generator().manual_seed(3)
    queries, keys, bias, values = _problem(gen, (), 30, 600, 9, 3)
    start = init_state((30,), 3)
    # a huge scale: almost every weight underflows, the max dominates
    ref = accumulate_reference(start, queries, keys, bias, values, 80.0)
    got = accumulate(start, queries, keys, bias, values, 80.0)
    _assert_close_states(got, ref)
    # every key of a chunk far below the rest (an "impossible" key set), before and after normal chunks
    awful = torch.full_like(bias, -1e30)
    for order in ((awful, bias), (bias, awful)):
        ref, got = start, start
        for b in order:
            ref = accumulate_reference(ref, queries, keys, b, values, 0.3)
            got = accumulate(got, queries, keys, b, values, 0.3)
        _assert_close_states(got, ref)
    # half the keys impossible
    mixed = torch.where(torch.arange(600) % 2 == 0, bias, awful)
    ref = accumulate_reference(start, queries, keys, mixed, values, 0.3)
    got = accumulate(start, queries, keys, mixed, values, 0.3)
    _assert_close_states(got, ref)


def _brute_force(queries, keys, bias, values, scale):
    """Σ_j softmax_j(ℓ_ij) v_j in float64 from the whole logits matrix ℓ = scale·q·kᵀ + bias: no streaming, no
    running max, no code shared with `softmax` (scale: a number or one per group)."""
    q, k, b, v = (t.to(torch.float64) for t in (queries, keys, bias, values))
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if scale.ndim:
        scale = scale[..., None, None]
    return torch.softmax(scale * (q @ k.transpose(-1, -2)) + b[..., None, :], dim=-1) @ v


def _chunked(state, queries, keys, bias, values, scale, chunks):
    """One state per chunk of keys, folded separately and merged (as threads or devices would)."""
    parts, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        parts.append(accumulate(state, queries, keys[..., sl, :], bias[..., sl], values[..., sl, :], scale,
                                key_offset=start))
        start += size
    return functools.reduce(merge, parts)


def test_float64_matches_brute_force():
    gen = torch.Generator().manual_seed(4)
    queries, keys, bias, values = _problem(gen, (2,), 10, 50, 9, 3, dtype=torch.float64)
    scale = torch.tensor([0.5, 0.2], dtype=torch.float64)                  # one per group
    want = _brute_force(queries, keys, bias, values, scale)
    start = init_state((2, 10), 3, dtype=torch.float64)
    got = finalize(accumulate(start, queries, keys, bias, values, scale))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    merged = _chunked(start, queries, keys, bias, values, scale, [7, 1, 30, 12])
    torch.testing.assert_close(finalize(merged), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", ["fallback", pytest.param("compiled", marks=needs_compiler)])
def test_float32_matches_brute_force(path, monkeypatch):
    if path == "fallback":
        monkeypatch.setattr(fastkernel._KERNEL, "_state", "unavailable")
    gen = torch.Generator().manual_seed(5)
    queries, keys, bias, values = _problem(gen, (), 10, 50, 9, 2)
    start = init_state((10,), 2)
    assert (fastkernel.try_accumulate(start, queries, keys, bias, values, 0.5) is None) == (path == "fallback")
    want = _brute_force(queries, keys, bias, values, 0.5)
    got = finalize(accumulate(start, queries, keys, bias, values, 0.5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    merged = _chunked(start, queries, keys, bias, values, 0.5, [7, 1, 30, 12])
    torch.testing.assert_close(finalize(merged).double(), want, rtol=1e-5, atol=1e-5)


def test_input_state_is_not_modified_and_empty_chunk_is_identity():
    gen = torch.Generator().manual_seed(6)
    queries, keys, bias, values = _problem(gen, (), 12, 90, 9, 3)
    state = accumulate(init_state((12,), 3, topk=2), queries, keys, bias, values, 0.4)
    before = [t.clone() for t in (state.m, state.l, state.acc, state.topk_logit)]
    accumulate(state, queries, keys, bias, values, 0.4)
    for old, new in zip(before, (state.m, state.l, state.acc, state.topk_logit), strict=True):
        assert torch.equal(old, new)
    assert accumulate(state, queries, keys[:0], bias[:0], values[:0], 0.4) is state


def test_merge_is_associative_and_matches_one_pass():
    gen = torch.Generator().manual_seed(7)
    queries, keys, bias, values = _problem(gen, (2,), 15, 300, 9, 3)
    start = init_state((2, 15), 3, topk=3)
    parts = [accumulate_reference(start, queries, keys[..., s:s + 100, :], bias[..., s:s + 100],
                                  values[..., s:s + 100, :], 0.6, key_offset=s) for s in (0, 100, 200)]
    left = merge(merge(parts[0], parts[1]), parts[2])
    right = merge(parts[0], merge(parts[1], parts[2]))
    whole = accumulate_reference(start, queries, keys, bias, values, 0.6)
    for a in (left, right):
        torch.testing.assert_close(finalize(a), finalize(whole), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.m, whole.m)
        assert torch.equal(a.topk_index, whole.topk_index)
    # merging with an empty state changes nothing
    torch.testing.assert_close(finalize(merge(whole, start)), finalize(whole))


def test_loader_reports_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("SCOREFIELD_CACHE", str(tmp_path))
    assert build.cache_dir() == tmp_path
    assert kernels.LOGIT_FLOOR < -50


@needs_compiler
@pytest.mark.parametrize("dim", [9, 80])
def test_many_query_blocks_and_key_tiles(dim):
    gen = torch.Generator().manual_seed(8)
    queries, keys, bias, values = _problem(gen, (), 300, 1100, dim, 2)     # > one query block and key tile
    start = init_state((300,), 2, topk=4)
    ref = accumulate_reference(start, queries, keys, bias, values, 0.5 / dim**0.5, key_offset=11)
    got = accumulate(start, queries, keys, bias, values, 0.5 / dim**0.5, key_offset=11)
    _assert_close_states(got, ref)
    assert torch.equal(got.topk_index, ref.topk_index)


@needs_compiler
@pytest.mark.parametrize("dim", [16, 17, 28, 50, 64, 65])
def test_direct_path_edges_with_topk(dim):
    """D around the direct-path limit, rows not a multiple of the 6-row block, keys not a multiple of the
    16-key panel and longer than one key tile, a top-k that is not yet full in the first chunk."""
    gen = torch.Generator().manual_seed(100 + dim)
    queries, keys, bias, values = _problem(gen, (), 13, 1061, dim, 4)
    chunks = [3, 17, 530, 511]
    scale = 0.6 / dim**0.5
    start = init_state((13,), 4, topk=8)
    ref = _fold(accumulate_reference, start, queries, keys, bias, values, scale, chunks)
    got = _fold(accumulate, start, queries, keys, bias, values, scale, chunks)
    assert fastkernel.try_accumulate(start, queries, keys, bias, values, scale) is not None
    _assert_close_states(got, ref)
    assert torch.equal(got.topk_index, ref.topk_index)
    torch.testing.assert_close(got.topk_logit, ref.topk_logit, rtol=1e-5, atol=1e-4)


@needs_compiler
def test_padded_panel_keys_never_enter_topk():
    """Fewer real keys than the top-k holds, all in one padded panel: the padding must stay out."""
    gen = torch.Generator().manual_seed(12)
    queries, keys, bias, values = _problem(gen, (), 7, 5, 30, 1)
    start = init_state((7,), 1, topk=8)
    got = fastkernel.try_accumulate(start, queries, keys, bias, values, 0.2, key_offset=40)
    ref = accumulate_reference(start, queries, keys, bias, values, 0.2, key_offset=40)
    assert got is not None
    assert torch.equal(got.topk_index, ref.topk_index)
    assert (got.topk_index[:, 5:] == -1).all() and torch.isinf(got.topk_logit[:, 5:]).all()
    _assert_close_states(got, ref)


def test_key_panels_layout():
    keys = torch.arange(2 * 20 * 3, dtype=torch.float32).reshape(2, 20, 3)   # [G, K, D]
    panels = fastkernel._key_panels(keys)                                      # [G, 2, D, 16]
    assert panels.shape == (2, 2, 3, fastkernel.KEY_PANEL)
    assert torch.equal(panels[1, 0, 2], keys[1, :16, 2])
    assert torch.equal(panels[0, 1, 1, :4], keys[0, 16:, 1])
    assert (panels[:, 1, :, 4:] == 0).all()
