"""The streaming posterior: x̂₀ = Σ_j softmax_j(ℓ_j)·v_j over a key source, folded chunk by chunk.

With a = √ᾱ, s² = 1−ᾱ the logit ℓ_j = −‖q − a·k_j‖²/(2s²) + logw_j (kamb-ganguli eq. 10 / 40) is, up to a
per-query constant, the attention score [q·a/s², −a²/2s²]·[k_j, ‖k_j‖²] + logw_j, so one GEMM serves a batch of
mixed noise levels; the sum runs as an exact streaming log-sum-exp (`kernels.accumulate`, looked up at call
time) in query blocks and key chunks sized to a memory budget. In float32 each query's top keys are recomputed
exactly (float64, distance form) before normalizing, since the expansion cancels at low noise; over a clustered
bank, `pruned_posterior` skips per query the clusters whose certified upper bound on mass is negligible.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import fused, kernels, progress, pruning
from .banks import ClusteredBank, KeySource
from .errors import PatchMemoryError
from .memory import check_fits

Tensor = torch.Tensor

DEFAULT_MEMORY_BUDGET = 2 * 2**30        # bytes
MIN_NOISE_VARIANCE = 1e-10               # ᾱ = 1 is treated as s² = 1e-10: the posterior is the nearest patch
DEFAULT_TOPK = 8
MAX_QUERY_BLOCK = 8192
REST_FLOOR = 1e-6                        # relative mass below which the float32 remainder is rounding noise
PIECE_KEYS = 2**15                       # keys of one cluster folded at once by the pruned posterior
FULL_PASS_FRACTION = 0.6                 # above this fraction of pairs to fold, one plain pass is cheaper
FULL_PASS_KEYS = 2**16                   # keys per chunk of that plain pass
SMALL_FOLD_PAIRS = 2**21                 # folds of fewer (query, key) pairs run on one thread
PROGRESS_PAIRS = 2e9                     # show a progress bar above this many query-key pairs (≈ seconds here)


def noise_coefficients(alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """(a, s²) = (√ᾱ, 1−ᾱ) in float64, with s² floored so that ᾱ = 1 means 'nearest patch'."""
    ab = alpha_bar.to(torch.float64)
    return ab.sqrt(), (1 - ab).clamp_min(MIN_NOISE_VARIANCE)


def augment_queries(queries: Tensor, a: Tensor, s2: Tensor, dtype: torch.dtype) -> Tensor:
    """[q·a/s², −a²/(2s²)]: [G, Q, D+1] from queries [G, Q, D] and per-query a, s² [G, Q]."""
    scale = (a / s2).to(dtype)[..., None]
    bias = (-(a * a) / (2 * s2)).to(dtype)[..., None]
    return torch.cat([queries.to(dtype) * scale, bias], dim=-1)



@dataclass
class Budget:
    """Block sizes that keep one call within `memory_budget` bytes."""

    query_block: int
    chunk_keys: int
    estimate: int


def plan_memory(groups: int, queries: int, dim: int, value_dim: int, num_keys: int, itemsize: int, topk: int,
                memory_budget: float, key_extra_bytes: float = 0.0, chunk_keys: int | None = None,
                fused: bool = False) -> Budget:
    """Choose a query block and a key chunk so that the working set fits in `memory_budget`; raise
    PatchMemoryError (with the estimate) when even the smallest blocks do not fit. `fused`: the compiled
    kernel folds each score tile in cache and allocates nothing per (query, key) pair."""
    track = 2 * itemsize + 16 if topk else 0
    pair = 0 if fused else 4 * itemsize + track                # logits, exp, temporaries, top-k candidates
    per_key = (2 * (dim + 1) + value_dim + 1) * itemsize + key_extra_bytes * itemsize
    per_query = (2 * (dim + 1) + value_dim + 2) * itemsize + topk * (itemsize + 8)
    fixed = groups * queries * per_query
    fix_bytes = 3 * topk * (dim + value_dim) * 8               # exact top-k recomputation per query (float64)

    def estimate(qb: int, kc: int) -> int:
        return int(fixed + groups * (qb * kc * pair + kc * per_key + qb * fix_bytes))

    qb = min(queries, MAX_QUERY_BLOCK)
    if chunk_keys is not None:
        kc = max(1, min(int(chunk_keys), num_keys))
        while qb > 1 and estimate(qb, kc) > memory_budget:
            qb = max(1, qb // 2)
        if estimate(qb, kc) > memory_budget:
            raise PatchMemoryError(
                f"chunk of {kc} keys per group needs about {estimate(qb, kc) / 2**20:.0f} MiB, over the "
                f"memory budget of {memory_budget / 2**20:.0f} MiB; use a smaller chunk_images")
        return Budget(qb, kc, estimate(qb, kc))
    while True:
        spare = memory_budget - fixed - groups * qb * fix_bytes
        kc = int(spare // (groups * (qb * pair + per_key))) if spare > 0 else 0
        if fused:   # nothing grows with the pairs: a quarter of the budget for a chunk is plenty
            kc = min(kc, int(memory_budget // (4 * groups * per_key)))
        if kc >= min(num_keys, 256) or (kc >= 1 and qb == 1):
            kc = min(kc, num_keys)
            return Budget(qb, kc, estimate(qb, kc))
        if qb == 1:
            raise PatchMemoryError(
                f"needs about {estimate(1, 1) / 2**20:.0f} MiB even one query and one key at a time "
                f"({groups} groups × {queries} queries of dimension {dim}), over the memory budget of "
                f"{memory_budget / 2**20:.0f} MiB; raise memory_budget or denoise fewer samples at once")
        qb = max(1, qb // 2)


def softmax_posterior(queries: Tensor, a: Tensor, s2: Tensor, source: KeySource, *,
                      dtype: torch.dtype = torch.float32, topk: int = DEFAULT_TOPK,
                      provenance: bool = False, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                      chunk_keys: int | None = None,
                      merge: Callable[[kernels.SoftmaxState], kernels.SoftmaxState] | None = None,
                      ) -> tuple[Tensor, Tensor | None]:
    """Posterior mean Σ_j softmax_j(ℓ_ij)·v_j over a key source, streamed (kamb-ganguli eq. 8, 10, 40).

    queries: [G, Q, D] raw query patches; a, s2: [G, Q] (float64) noise coefficients of each query.
    Returns (mean [G, Q, V] in `dtype`, best [G, Q] global index of the arg-max key or None).
    In float32 the top-`topk` keys of each query are recomputed exactly (float64, distance form).
    merge: the source is one part of a larger bank (e.g. one rank's shard, `scorefield.distributed`): the
    float64 state of all queries (top keys already corrected) goes through merge(state) → the state over the
    whole bank, then is normalized; no provenance.
    """
    if merge is not None and provenance:
        raise ValueError("provenance is not available for a merged (partial-bank) posterior")
    g, q, d = queries.shape
    exact_fix = dtype != torch.float64 and topk > 0
    track = topk if exact_fix else (1 if provenance else 0)
    itemsize = torch.finfo(dtype).bits // 8
    in_cache = (dtype == torch.float32 and queries.device.type == "cpu"
                and source.value_dim <= fused.MAX_VALUE_DIM and fused.available())
    plan = plan_memory(g, q, d, source.value_dim, source.num_keys, itemsize, track, memory_budget,
                       source.bytes_per_key_extra, chunk_keys, fused=in_cache)
    check_fits(plan.estimate, queries.device, "the patch posterior",
               "lower memory_budget (smaller chunks) or denoise fewer samples at once")
    source.set_chunk_keys(plan.chunk_keys)
    q_aug = augment_queries(queries, a, s2, dtype)                               # [G, Q, D+1]
    blocks = [(start, min(start + plan.query_block, q)) for start in range(0, q, plan.query_block)]
    states = [kernels.init_state((g, stop - start), source.value_dim, dtype, queries.device, topk=track)
              for start, stop in blocks]
    n_chunks = math.ceil(source.num_keys / source.chunk_keys)
    show = g * q * source.num_keys > PROGRESS_PAIRS and progress.enabled()
    extras: list[Tensor | None] = [None] * len(blocks)      # log-weight of merged top keys over their own
    for offset, k_aug, logw, values, index, extra in tqdm(source.mapped_chunks(dtype), total=n_chunks,
                                                          disable=not show, desc="patch posterior", leave=False):
        for i, (start, stop) in enumerate(blocks):
            before = states[i]
            states[i] = kernels.accumulate(before, q_aug[:, start:stop], k_aug, logw, values, 1.0,
                                           key_offset=offset)
            if index is not None and track:
                extras[i] = _remap_topk(states[i], before.topk_index, extras[i], offset, index,
                                        extra if exact_fix else None)
    if merge is not None:   # one state for all queries, whatever this part's block sizes: one merge call
        parts = [exact_topk_correction(state, queries[:, start:stop], a[:, start:stop], s2[:, start:stop], source,
                                       memory_budget, extra, return_state=True)[0] if exact_fix else state
                 for (start, stop), state, extra in zip(blocks, states, extras, strict=True)]
        whole = kernels.SoftmaxState(*(torch.cat([getattr(p, k).double() for p in parts], 1)
                                       for k in ("m", "l", "acc")))
        return kernels.finalize(merge(whole)).to(dtype), None
    means, bests = [], []
    for (start, stop), state, extra in zip(blocks, states, extras, strict=True):
        if exact_fix:
            mean, best = exact_topk_correction(state, queries[:, start:stop], a[:, start:stop],
                                               s2[:, start:stop], source, memory_budget, extra)
            means.append(mean.to(dtype))
            bests.append(best)
        else:
            means.append(kernels.finalize(state))
            bests.append(state.topk_index[..., 0] if provenance else None)
    best = torch.cat(bests, 1) if provenance else None
    return torch.cat(means, 1), best


def _remap_topk(state: kernels.SoftmaxState, previous: Tensor, previous_extra: Tensor | None, offset: int,
                index: Tensor, extra: Tensor | None) -> Tensor | None:
    """Map (in place) the top keys a merged chunk just contributed, tracked as offset + u, to the global index
    index[g, u] they stand for; returns their log-weight excess over that key (extra [G, U]), carried along for
    the keys kept from before (indices below offset, previous [G, q, k] with excess previous_extra)."""
    tk = state.topk_index                                                        # [G, q, k]
    g, q, k = tk.shape
    fresh = tk >= offset
    local = (tk - offset).clamp(0, index.shape[1] - 1).reshape(g, -1)
    state.topk_index = torch.where(fresh, torch.gather(index, 1, local).reshape(g, q, k), tk)
    if extra is None:
        return None
    out = torch.gather(extra, 1, local).reshape(g, q, k)
    if previous_extra is not None:
        same = (tk[..., :, None] == previous[..., None, :]) & (previous >= 0)[..., None, :]   # [G, q, k, k]
        kept = (same.to(previous_extra.dtype) * previous_extra[..., None, :]).sum(-1)
        out = torch.where(fresh, out, kept)
    else:
        out = torch.where(fresh, out, torch.zeros_like(out))
    return out


def _take_state(state: kernels.SoftmaxState, rows: Tensor) -> kernels.SoftmaxState:
    """The state of queries `rows` [q'] of a single-group state [1, Q, ...] (index_select: advanced indexing
    is far slower on a busy machine)."""
    pick = (lambda t: None if t is None else t.index_select(1, rows))  # noqa: E731
    return kernels.SoftmaxState(pick(state.m), pick(state.l), pick(state.acc), pick(state.topk_logit),
                                pick(state.topk_index))


def _put_state(state: kernels.SoftmaxState, rows: Tensor, part: kernels.SoftmaxState) -> None:
    state.m.index_copy_(1, rows, part.m)
    state.l.index_copy_(1, rows, part.l)
    state.acc.index_copy_(1, rows, part.acc)
    if state.topk_logit is not None:
        state.topk_logit.index_copy_(1, rows, part.topk_logit)
        state.topk_index.index_copy_(1, rows, part.topk_index)


def pruned_posterior(queries: Tensor, a: Tensor, s2: Tensor, bank: ClusteredBank, *,
                     dtype: torch.dtype = torch.float32, topk: int = DEFAULT_TOPK, provenance: bool = False,
                     tolerance: float = pruning.DEFAULT_TOLERANCE,
                     memory_budget: float = DEFAULT_MEMORY_BUDGET) -> tuple[Tensor, Tensor | None, dict]:
    """`softmax_posterior` over a clustered bank, skipping per query the clusters whose certified upper bound
    on mass is negligible: the skipped mass is at most `tolerance` of the total (`pruning` module docstring).

    Per block of queries: bound every cluster's mass from above and log Z from below (`pruning.cluster_bounds`),
    then fold, per query, every cluster except those whose summed upper bounds stay within tolerance·Z
    (`pruning.select_clusters`); when that would still fold more than FULL_PASS_FRACTION of the pairs, one
    plain pass over the whole bank is cheaper and nothing is skipped.
    queries: [1, Q, D]; a, s2: [1, Q] (float64). Returns (mean [1, Q, V], best [1, Q] or None, stats), stats =
    {pairs_evaluated, pairs_total (Q × the bank before deduplication), neglected_bound (max over queries of
    the bound on the neglected fraction of the mass)}.
    """
    _, q, d = queries.shape
    # a block holds a few [q', C] float64 matrices and its softmax state
    block = max(1, min(MAX_QUERY_BLOCK * 4, int(memory_budget // (16 * 8 * max(1, bank.index.clusters)
                                                                  + 16 * 8 * (d + 1)))))
    means, bests, evaluated, neglected = [], [], 0, 0.0
    threads = torch.get_num_threads()
    try:   # the many small operations are over before a second thread is scheduled on a shared machine
        torch.set_num_threads(1)
        for start in range(0, q, block):
            sl = slice(start, start + block)
            mean, best, pairs, bound = _pruned_block(queries[:, sl], a[:, sl], s2[:, sl], bank, dtype, topk,
                                                     provenance, tolerance, memory_budget, threads)
            means.append(mean)
            bests.append(best)
            evaluated += pairs
            neglected = max(neglected, bound)
    finally:
        torch.set_num_threads(threads)
    stats = {"pairs_evaluated": evaluated, "pairs_total": q * bank.raw_keys, "neglected_bound": neglected}
    return torch.cat(means, 1), torch.cat(bests, 1) if provenance else None, stats


def _pruned_block(queries: Tensor, a: Tensor, s2: Tensor, bank: ClusteredBank, dtype: torch.dtype, topk: int,
                  provenance: bool, tolerance: float, memory_budget: float, threads: int
                  ) -> tuple[Tensor, Tensor | None, int, float]:
    """One block of `pruned_posterior`: (mean [1, q, V], best [1, q] or None, pairs evaluated, bound)."""
    q = queries.shape[1]
    exact_fix = dtype != torch.float64 and topk > 0
    track = topk if exact_fix else (1 if provenance else 0)
    torch.set_num_threads(threads)                                                 # two GEMMs: [q, C, D]
    upper, lower = pruning.cluster_bounds(queries[0], a[0], s2[0], bank.index, bank.rep_keys, bank.rep_logw)
    torch.set_num_threads(1)
    mask, bound = pruning.select_clusters(upper, lower, tolerance)                 # [q, C], [q]
    q_aug = augment_queries(queries, a, s2, dtype)                                   # [1, q, D+1]
    state = kernels.init_state((1, q), bank.value_dim, dtype, queries.device, topk=track)
    if float((mask.sum(0) * bank.index.sizes()).sum()) > FULL_PASS_FRACTION * q * bank.num_keys:
        # little to skip: one plain pass in large chunks costs less than many small folds
        torch.set_num_threads(threads)
        for start, k_aug, logw, values in _pieces(bank, FULL_PASS_KEYS, dtype):
            state = kernels.accumulate(state, q_aug, k_aug, logw, values, 1.0, key_offset=start)
        torch.set_num_threads(1)
        evaluated, bound = q * bank.num_keys, torch.zeros(1, device=queries.device)
    else:
        evaluated = _fold_clusters(state, q_aug, bank, mask, dtype, threads)
    if exact_fix:
        mean, best = exact_topk_correction(state, queries, a, s2, bank, memory_budget)
        return mean.to(dtype), best if provenance else None, evaluated, float(bound.max())
    best = state.topk_index[..., 0] if provenance else None
    return kernels.finalize(state), best, evaluated, float(bound.max())


def _pieces(bank: ClusteredBank, size: int, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    for start in range(0, bank.num_keys, size):
        yield (start, *bank.keys_between(start, min(start + size, bank.num_keys), dtype))


def _fold_clusters(state: kernels.SoftmaxState, q_aug: Tensor, bank: ClusteredBank, mask: Tensor,
                   dtype: torch.dtype, threads: int) -> int:
    """Fold into `state` (in place) cluster c for the queries where mask [q, C] is set, large folds on
    `threads` threads, small ones on one; returns the number of pairs folded."""
    q = q_aug.shape[1]
    index = bank.index
    users = mask.sum(0)                                                          # [C] queries per cluster
    by_cluster = mask.T.contiguous()                                             # [C, q]
    evaluated = int((users * index.sizes()).sum())
    quiet = evaluated < PROGRESS_PAIRS or not progress.enabled()
    for c in tqdm(torch.nonzero(users).reshape(-1).tolist(), disable=quiet, desc="patch posterior", leave=False):
        rows = None if int(users[c]) == q else torch.nonzero(by_cluster[c]).reshape(-1)
        lo, hi = int(index.offsets[c]), int(index.offsets[c + 1])
        torch.set_num_threads(1 if int(users[c]) * (hi - lo) < SMALL_FOLD_PAIRS else threads)
        for start in range(lo, hi, PIECE_KEYS):
            k_aug, logw, values = bank.keys_between(start, min(start + PIECE_KEYS, hi), dtype)
            if rows is None:
                part = kernels.accumulate(state, q_aug, k_aug, logw, values, 1.0, key_offset=start)
                _put_state(state, torch.arange(q, device=q_aug.device), part)
            else:
                part = kernels.accumulate(_take_state(state, rows), q_aug.index_select(1, rows), k_aug, logw,
                                          values, 1.0, key_offset=start)
                _put_state(state, rows, part)
    torch.set_num_threads(1)
    return evaluated


def exact_topk_correction(state: kernels.SoftmaxState, queries: Tensor, a: Tensor, s2: Tensor,
                          source: KeySource, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                          extra: Tensor | None = None, return_state: bool = False
                          ) -> tuple[Tensor | kernels.SoftmaxState, Tensor]:
    """Replace the streamed (float32) contributions of each query's tracked top keys by exact ones.

    The streamed logit ℓ̃ = (a/s²)q·k − (a²/2s²)‖k‖² + logw carries an absolute error ~ eps·(a/s²)|q·k|, large
    at low noise; the exact logit in the same frame is −‖q − a·k‖²/(2s²) + ‖q‖²/(2s²) + logw in float64. The
    rest of the bank keeps its streamed weights, whose errors only matter when it carries non-negligible mass.
    queries [G, Q, D]; a, s2 [G, Q]. extra [G, Q, k] (float64, optional): what each tracked key's log-weight in
    the fold exceeds its own (a key merged with its duplicates). Returns (mean [G, Q, V] float64, best key [G, Q]);
    with return_state the corrected unnormalized float64 state (m, l [G, Q], acc [G, Q, V]) instead of the mean.
    """
    g, q, d = queries.shape
    k = state.topk_index.shape[-1]
    step = max(1, int(memory_budget // max(1, 4 * g * k * (d + source.value_dim) * 8)))
    means, bests, states = [], [], []
    for start in range(0, q, step):
        sl = slice(start, start + step)
        index = state.topk_index[:, sl]                                             # [G, q', k]
        keys, logw, values = source.gather(index)                                   # [G, q', k, D] ...
        if extra is not None:
            logw = logw + extra[:, sl]
        qd = queries[:, sl].double()
        ad, sd = a[:, sl][..., None], s2[:, sl][..., None]
        dist = ((qd[:, :, None, :] - ad[..., None] * keys) ** 2).sum(-1)            # [G, q', k]
        exact = (-dist + (qd * qd).sum(-1, keepdim=True)) / (2 * sd) + logw
        exact = exact.masked_fill(index < 0, -math.inf)
        m = state.m[:, sl].double()[..., None]                                      # [G, q', 1]
        approx_w = torch.exp(state.topk_logit[:, sl].double() - m).masked_fill(index < 0, 0.0)
        total = state.l[:, sl].double()                                             # [G, q']
        rest_l = total - approx_w.sum(-1)
        # a remainder within float32 rounding of the total is no mass at all: drop it (error < 2·REST_FLOOR)
        kept = rest_l > REST_FLOOR * total
        rest_l = torch.where(kept, rest_l, torch.zeros_like(rest_l))
        rest_acc = state.acc[:, sl].double() - (approx_w[..., None] * values).sum(-2)
        rest_acc = torch.where(kept[..., None], rest_acc, torch.zeros_like(rest_acc))
        # the exact top logits may sit far from the streamed max m (low noise): renormalize in log space
        log_rest = m + torch.log(rest_l)[..., None]                                 # −inf when dropped
        m_new = torch.maximum(log_rest, exact.amax(-1, keepdim=True))               # [G, q', 1]
        shrink = torch.where(kept, torch.exp(m - m_new)[..., 0], torch.zeros_like(rest_l))
        w = torch.exp(exact - m_new)                                                # [G, q', k]
        l_new = rest_l * shrink + w.sum(-1)
        acc_new = rest_acc * shrink[..., None] + (w[..., None] * values).sum(-2)
        means.append(acc_new / l_new[..., None])
        states.append((m_new[..., 0], l_new, acc_new))
        bests.append(torch.gather(index, -1, exact.argmax(-1, keepdim=True))[..., 0])
    if return_state:
        return kernels.SoftmaxState(*(torch.cat(t, 1) for t in zip(*states, strict=True))), torch.cat(bests, 1)
    return torch.cat(means, 1), torch.cat(bests, 1)



AUTOGRAD_PAIR_BYTES = 40                 # float64 bytes autograd keeps per (query, key) pair of a fold


def differentiable_posterior(queries: Tensor, a: Tensor, s2: Tensor, source: KeySource, *,
                             memory_budget: float = DEFAULT_MEMORY_BUDGET) -> Tensor:
    """`softmax_posterior` with gradients: the same streaming log-sum-exp (kamb-ganguli eq. 10 / 40), every key
    folded by the pure-torch reference in float64 so that autograd differentiates it exactly (no compiled
    kernel, no skipping, no float32 top-k fix, which would cut the graph).

    queries: [G, Q, D] (requires grad); a, s2: [G, Q] float64. Returns the mean [G, Q, V] in float64. Autograd
    keeps every fold's logits until the backward pass, so memory grows with Q × keys: refused with the
    estimate when it exceeds `memory_budget`.
    """
    g, q, _ = queries.shape
    need = AUTOGRAD_PAIR_BYTES * g * q * source.num_keys
    if need > memory_budget:
        raise PatchMemoryError(
            f"a differentiable call keeps about {need / 2**20:.0f} MiB of logits for the backward pass "
            f"({g * q} queries × {source.num_keys} keys), over the memory budget of {memory_budget / 2**20:.0f} "
            f"MiB; differentiate fewer samples at once, use fewer training images, or raise memory_budget")
    check_fits(need, queries.device, "a differentiable call", "differentiate fewer samples at once")
    source.set_chunk_keys(max(1, min(source.num_keys, int(memory_budget // (16 * max(1, g * q))))))
    q_aug = augment_queries(queries, a, s2, torch.float64)                        # [G, Q, D+1]
    state = kernels.init_state((g, q), source.value_dim, torch.float64, queries.device)
    for offset, k_aug, logw, values in source.augmented_chunks(torch.float64):
        state = kernels.accumulate_reference(state, q_aug, k_aug, logw, values, 1.0, key_offset=offset)
    return kernels.finalize(state)
