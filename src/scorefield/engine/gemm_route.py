"""The GEMM route of `PatchPosterior`: every group's queries against its key source as attention scores
[q·a/s², −a²/2s²]·[k, ‖k‖²] + logw, folded by the streaming posterior (`posterior`), with the flat shortcut of
`flat` and the pruned fold over a clustered bank. Runs on any device; on the CPU in float32 the folds use the
compiled kernel (`fused`); with `differentiable` every fold is the float64 pure-torch reference, so autograd
flows from the output to x."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import fused
from .banks import CachedBank, ClusteredBank
from .flat import FLAT_LOGIT_SPREAD, flat_logit_spread
from .geometry import extract_patches
from .posterior import differentiable_posterior, noise_coefficients, pruned_posterior, softmax_posterior

if TYPE_CHECKING:
    from .patch_posterior import PatchPosterior

Tensor = torch.Tensor


def fold_path(dtype: torch.dtype, device: torch.device, differentiable: bool) -> str:
    """Which implementation folds the keys: 'autograd' (float64 reference with gradients), 'compiled' (the fused
    CPU kernel) or 'reference' (pure torch: float64, other devices, or no compiler)."""
    if differentiable:
        return "autograd"
    if dtype == torch.float32 and device.type == "cpu" and fused.available():
        return "compiled"
    return "reference"


def denoise_gemm(engine: PatchPosterior, x: Tensor, ab: Tensor, patch_size: int, provenance: bool,
                 differentiable: bool) -> tuple[Tensor, Tensor | None, dict]:
    """(x̂₀ [B, C, H, W] in x's dtype, provenance [B, H, W, 3] or None, stats) of x [B, C, H, W] at ᾱ [B]."""
    b, c, h, w = x.shape
    a, s2 = noise_coefficients(ab)
    work = torch.float64 if differentiable else engine.dtype
    queries = extract_patches((x if differentiable else x.detach()).to(work), patch_size, engine.padding)
    parts: list[tuple[Tensor, Tensor]] = []                           # (query locations [Lq, G], mean [B, Lq, G, C])
    prov = torch.full((b, h * w, 3), -1, dtype=torch.int64, device=x.device) if provenance else None
    stats = {"patch_size": patch_size, "alpha_bar": ab.tolist(), "pairs_evaluated": 0, "pairs_total": 0,
             "neglected_bound": 0.0, "cross_term": "gemm", "device": str(x.device),
             "fold": fold_path(engine.dtype, x.device, differentiable)}
    for i, gb in enumerate(engine.layout(patch_size)):
        source = engine.bank(patch_size, i)
        query_locs = gb.query_locs.to(x.device)
        lq = query_locs.shape[1]
        q, a_q, s2_q = group_queries(queries, a, s2, query_locs, gb.groups)
        mean, best, part = _fold_group(engine, q, a_q, s2_q, source, patch_size, i, gb.key_locs.shape[1],
                                       provenance, differentiable)
        for key in ("pairs_evaluated", "pairs_total"):
            stats[key] += part[key]
        stats["neglected_bound"] = max(stats["neglected_bound"], part["neglected_bound"])
        locs = query_locs.T                                                      # [Lq, G]
        parts.append((locs, mean.reshape(gb.groups, b, lq, c).permute(1, 2, 0, 3)))
        if provenance:
            prov[:, locs] = source.sources(best).reshape(gb.groups, b, lq, 3).permute(1, 2, 0, 3).to(x.device)
    stats["fraction"] = stats["pairs_evaluated"] / max(1, stats["pairs_total"])
    result = scatter_groups(parts, b, c, work).transpose(1, 2).reshape(b, c, h, w).to(x.dtype)
    return result, None if prov is None else prov.reshape(b, h, w, 3), stats


def group_queries(queries: Tensor, a: Tensor, s2: Tensor, query_locs: Tensor, groups: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The queries of one group batch as rows: patches [G, B·Lq, D] and their a, s² [G, B·Lq], from patches
    [B, H·W, D], per-sample a, s² [B] and the batch's query locations [G, Lq]."""
    b, lq = queries.shape[0], query_locs.shape[1]
    q = queries[:, query_locs].permute(1, 0, 2, 3).reshape(groups, b * lq, -1)
    a_q = a[:, None].expand(b, lq).reshape(1, -1).expand(groups, -1)
    s2_q = s2[:, None].expand(b, lq).reshape(1, -1).expand(groups, -1)
    return q, a_q, s2_q


def scatter_groups(parts: list[tuple[Tensor, Tensor]], b: int, c: int, dtype: torch.dtype) -> Tensor:
    """[B, H·W, C] from each group batch's means [B, Lq, G, C] at its query locations [Lq, G]. The group batches
    partition the H·W locations, so one permutation puts every pixel in place (out of place: autograd follows)."""
    locs = torch.cat([loc.reshape(-1) for loc, _ in parts])                      # [H·W]
    means = torch.cat([mean.reshape(b, -1, c).to(dtype) for _, mean in parts], 1)  # [B, H·W, C]
    return means[:, torch.argsort(locs)]


def _fold_group(engine: PatchPosterior, q: Tensor, a_q: Tensor, s2_q: Tensor, source, patch_size: int,
                batch_index: int, locs_per_image: int, provenance: bool, differentiable: bool
                ) -> tuple[Tensor, Tensor | None, dict]:
    """(mean [G, Q, C], arg-max key [G, Q] or None, {pairs_evaluated, pairs_total, neglected_bound})."""
    groups = q.shape[0]
    raw = getattr(source, "raw_keys", source.num_keys)
    total = q.shape[1] * raw * groups
    if differentiable:
        mean = differentiable_posterior(q, a_q, s2_q, source, memory_budget=engine.memory_budget)
        return mean, None, {"pairs_evaluated": total, "pairs_total": total, "neglected_bound": 0.0}
    spread = flat_logit_spread(q, a_q, s2_q, engine.max_pixel)
    if not provenance and spread <= FLAT_LOGIT_SPREAD:
        # every logit equals logw to within `spread`: the posterior is the prior mean of the bank, exact up to a
        # relative weight error e^{2·spread} − 1 (the first steps from pure noise)
        mean = engine.prior_mean(patch_size, batch_index)[:, None, :].expand(groups, q.shape[1], -1)
        return mean, None, {"pairs_evaluated": 0, "pairs_total": total, "neglected_bound": math.expm1(2 * spread)}
    if isinstance(source, ClusteredBank):
        return pruned_posterior(q, a_q, s2_q, source, dtype=engine.dtype, topk=engine.topk, provenance=provenance,
                                tolerance=engine.prune_tolerance, memory_budget=engine.memory_budget)
    chunk = None if engine.chunk_images is None or isinstance(source, CachedBank) \
        else engine.chunk_images * locs_per_image
    mean, best = softmax_posterior(q, a_q, s2_q, source, dtype=engine.dtype, topk=engine.topk,
                                   provenance=provenance, memory_budget=engine.memory_budget, chunk_keys=chunk)
    return mean, best, {"pairs_evaluated": q.shape[1] * source.folded_keys * groups, "pairs_total": total,
                        "neglected_bound": 0.0}
