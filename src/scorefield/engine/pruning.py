"""Certified pruning of a patch bank: clusters with a centroid and a radius bound every logit inside them.

With a = √ᾱ, s² = 1−ᾱ, the logit of bank key k for query q is ℓ = −‖q − a·k‖²/(2s²) + logw_k (kamb-ganguli
eq. 10 / 40, in the distance frame). For a cluster of keys within radius r of a centroid c, the triangle
inequality gives, for every member,

    ‖q − a·c‖ − a·r  ≤  ‖q − a·k‖  ≤  ‖q − a·c‖ + a·r,

so the cluster's total mass Σ_k exp(ℓ_k) lies between exp(λ_c − (d + a·r)²/(2s²)) and
exp(λ_c − max(0, d − a·r)²/(2s²)), where d = ‖q − a·c‖ and λ_c = log Σ_{k∈c} w_k (multiplicities included).
The lower bounds, summed over the (disjoint) clusters, bound the partition function Z from below; a cluster
may then be skipped for a query when the upper bounds of all skipped clusters sum to at most `tolerance`·Z.
The bound on the neglected fraction of the mass is reported: skipping changes the posterior mean by at most
that fraction times the spread of the values.

Clusters come from a few Lloyd iterations (k-means) on a sample of the bank and one assignment pass over all
keys; the radius is the exact largest member distance, so the bounds hold whatever the clustering's quality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

DEFAULT_TOLERANCE = 1e-6
LLOYD_ITERATIONS = 3
SAMPLE_PER_CLUSTER = 16
ASSIGN_BLOCK = 16384
MAX_CLUSTERS = 4096
CLUSTER_FLOPS = 3 * 10**10
# rounding of a float32 dot product of length D is at most ≈ D·eps·Σ|q_i||c_i| ≤ D·eps·(‖q‖² + ‖c‖²)/2
# (the standard γ_D bound); twice that covers the norms and the expansion ‖q‖² + a²‖c‖² − 2a·q·c
FLOAT32_EPS = 2.0**-24
RADIUS_SLACK = 1e-5


class PruningError(ValueError):
    """An invalid pruning configuration (tolerance, cluster count)."""


@dataclass
class ClusterIndex:
    """Clusters of one bank: key j (in cluster-sorted order) belongs to cluster c for offsets[c] ≤ j <
    offsets[c+1]; `order[j]` is its index in the unsorted bank.

    centroids: [C, D] float64; radii: [C] float64 (max member distance, padded by a rounding slack);
    log_mass: [C] float64 log Σ_k w_k of the members; offsets: [C+1]; order: [K]; representative: [C] the
    sorted position of each cluster's member nearest to its centroid (a real key, whose exact logit bounds
    log Z from below).
    """

    centroids: Tensor
    radii: Tensor
    log_mass: Tensor
    offsets: Tensor
    order: Tensor
    representative: Tensor

    @property
    def clusters(self) -> int:
        return self.centroids.shape[0]

    def sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def check_tolerance(tolerance: float) -> float:
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise PruningError(f"prune tolerance must be a number in (0, 1), got {tolerance!r}")
    return float(tolerance)


def default_cluster_count(num_keys: int, dim: int) -> int:
    """About 64 keys per cluster (small radii, so tight bounds), at most MAX_CLUSTERS and at most what one
    assignment pass of CLUSTER_FLOPS multiply-adds allows (the pass costs K·C·D)."""
    by_cost = CLUSTER_FLOPS // max(1, num_keys * dim)
    return int(max(1, min(num_keys // 64, MAX_CLUSTERS, by_cost)))


def kmeans_centroids(sample: Tensor, clusters: int, generator: torch.Generator,
                     iterations: int = LLOYD_ITERATIONS) -> Tensor:
    """Centroids [C, D] (float32) from Lloyd iterations on sample [S, D], seeded with distinct sample rows."""
    s = sample.shape[0]
    clusters = min(clusters, s)
    centroids = sample[torch.randperm(s, generator=generator, device="cpu")[:clusters].to(sample.device)].clone()
    for _ in range(iterations):
        label, _ = nearest_centroid(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, label, sample)
        ones = torch.ones_like(label, dtype=sample.dtype)
        counts = torch.zeros(clusters, dtype=sample.dtype, device=sample.device).index_add_(0, label, ones)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def nearest_centroid(keys: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """(label [K], exact distance [K]) of each key [K, D] to its nearest centroid [C, D] (blocked GEMM for the
    arg-min, the distance then recomputed directly so that no cancellation enters the radius)."""
    c_norm = (centroids * centroids).sum(-1)                                   # [C]
    labels, dists = [], []
    for start in range(0, keys.shape[0], ASSIGN_BLOCK):
        block = keys[start:start + ASSIGN_BLOCK]
        score = c_norm[None, :] - 2 * block @ centroids.T                      # [k, C] ‖c‖² − 2k·c
        label = score.argmin(-1)
        labels.append(label)
        dists.append((block.double() - centroids[label].double()).norm(dim=-1))
    return torch.cat(labels), torch.cat(dists)


def build_cluster_index(labels: Tensor, dists: Tensor, logw: Tensor, centroids: Tensor) -> ClusterIndex:
    """Sort keys by cluster and collect each cluster's radius and log-mass; empty clusters are dropped.

    labels, dists, logw: [K] per key; centroids: [C, D]."""
    c = centroids.shape[0]
    device = labels.device
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=c)
    kept = counts > 0
    remap = torch.cumsum(kept.long(), 0) - 1                                   # old cluster -> new
    new_labels = remap[labels]
    c_new = int(kept.sum())
    radii = torch.zeros(c_new, dtype=torch.float64, device=device).scatter_reduce(0, new_labels, dists.double(), "amax")
    lw = logw.double()
    top = torch.full((c_new,), -math.inf, dtype=torch.float64, device=device).scatter_reduce(0, new_labels, lw, "amax")
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros(c_new, dtype=torch.float64, device=device).index_add_(
        0, new_labels, torch.exp(lw - safe_top[new_labels]))
    offsets = torch.zeros(c_new + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts[kept], 0)
    sorted_dist = dists.double()[order]                                        # [K] in cluster order
    sorted_label = new_labels[order]
    nearest = torch.full((c_new,), math.inf, dtype=torch.float64, device=device).scatter_reduce(
        0, sorted_label, sorted_dist, "amin")
    position = torch.arange(order.shape[0], device=device)
    is_nearest = sorted_dist == nearest[sorted_label]
    representative = torch.full((c_new,), order.shape[0], dtype=torch.int64, device=device).scatter_reduce(
        0, sorted_label[is_nearest], position[is_nearest], "amin")
    return ClusterIndex(centroids=centroids[kept].double(), radii=radii * (1 + RADIUS_SLACK) + RADIUS_SLACK,
                        log_mass=safe_top + torch.log(mass), offsets=offsets, order=order,
                        representative=representative)


def _distances(q: Tensor, q_norm: Tensor, a: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds [Q, C] on ‖q − a·p‖ for queries q [Q, D] and points [C, D]: the cross term is a
    float32 GEMM (the bound pass must stay cheap next to the posterior itself), widened by its worst-case
    rounding error; norms and the rest in float64."""
    p_norm = (points * points).sum(-1)[None, :]                                # [1, C]
    cross = (q.float() @ points.float().T).double()                            # [Q, C]
    sq = q_norm + a * a * p_norm - 2 * a * cross                               # [Q, C]
    slack = 4 * q.shape[-1] * FLOAT32_EPS * (q_norm + a * a * p_norm)
    return (sq - slack).clamp_min(0).sqrt(), (sq + slack).clamp_min(0).sqrt()


def cluster_bounds(queries: Tensor, a: Tensor, s2: Tensor, index: ClusterIndex, rep_keys: Tensor,
                   rep_logw: Tensor) -> tuple[Tensor, Tensor]:
    """Upper bounds [Q, C] on each cluster's log-mass for each query, and a lower bound [Q] on log Z.

    queries: [Q, D]; a, s2: [Q] (float64); rep_keys [C, D], rep_logw [C]: each cluster's representative key.
    Per cluster the larger of two lower bounds counts: the whole cluster at its farthest (radius bound) or
    its representative alone (exact). Distance frame: ℓ = −‖q − a·k‖²/(2s²) + logw (module docstring)."""
    q = queries.double()
    a, s2 = a.double()[:, None], s2.double()[:, None]                          # [Q, 1]
    q_norm = (q * q).sum(-1, keepdim=True)                                     # [Q, 1]
    d_low, d_high = _distances(q, q_norm, a, index.centroids)                  # [Q, C]
    ar = a * index.radii[None, :]                                              # [Q, C]
    upper = index.log_mass[None, :] - (d_low - ar).clamp_min(0) ** 2 / (2 * s2)
    whole = index.log_mass[None, :] - (d_high + ar) ** 2 / (2 * s2)
    _, rep_high = _distances(q, q_norm, a, rep_keys.double())
    single = rep_logw.double()[None, :] - rep_high ** 2 / (2 * s2)
    return upper, torch.logsumexp(torch.maximum(whole, single), dim=-1)


def select_clusters(upper: Tensor, lower: Tensor, tolerance: float) -> tuple[Tensor, Tensor]:
    """Which clusters each query must evaluate: mask [Q, C], and the certified bound [Q] on the neglected
    fraction of the mass, Σ_skipped exp(upper) / exp(lower) ≤ tolerance.

    Per query the clusters with the smallest upper bounds are skipped for as long as their summed bound stays
    within tolerance·exp(lower) (a lower bound on tolerance·Z)."""
    ordered, rank = upper.sort(dim=-1)                                        # ascending
    cumulative = torch.logcumsumexp(ordered, dim=-1)                          # [Q, C]
    budget = lower[:, None] + math.log(tolerance)
    skip_sorted = cumulative <= budget
    mask = torch.ones_like(skip_sorted).scatter_(-1, rank, ~skip_sorted)
    skipped = torch.where(skip_sorted, cumulative, torch.full_like(cumulative, -math.inf)).amax(-1)
    return mask, torch.exp(skipped - lower)
