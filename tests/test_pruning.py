"""Certified cluster pruning: the bounds hold, the skipped mass stays below the tolerance, and the pruned
posterior differs from the full one by less than the reported bound."""
import math

import pytest
import torch

import scorefield.engine as P
from scorefield.engine import pruning


def _bank_images(n=24, h=10, w=10, seed=0):
    """Images with large flat regions (many identical patches) and a few strokes, like MNIST."""
    g = torch.Generator().manual_seed(seed)
    images = -torch.ones(n, 1, h, w)
    for i in range(n):
        y, x = torch.randint(0, h - 4, (2,), generator=g).tolist()
        images[i, 0, y:y + 4, x:x + 2] = torch.rand(4, 2, generator=g) * 2 - 1
    return images


def _noisy(images, ab, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = images[:b].roll(shifts=(1, 3), dims=(2, 3))
    return math.sqrt(ab) * clean + math.sqrt(1 - ab) * torch.randn(clean.shape, generator=g)


def _exact_cluster_logmass(queries, a, s2, bank):
    """log Σ_{k∈c} w_k exp(−‖q − a·k‖²/(2s²)) per query and cluster, in float64 from the members."""
    keys, logw, _ = bank.take(torch.arange(bank.num_keys))
    dist = ((queries.double()[:, None, :] - a[:, None, None] * keys.double()[None]) ** 2).sum(-1)   # [Q, K]
    logits = -dist / (2 * s2[:, None]) + logw.double()[None]
    out = []
    for c in range(bank.index.clusters):
        lo, hi = int(bank.index.offsets[c]), int(bank.index.offsets[c + 1])
        out.append(torch.logsumexp(logits[:, lo:hi], -1))
    return torch.stack(out, -1), torch.logsumexp(logits, -1)


@pytest.mark.parametrize("ab", [0.1, 0.8, 0.995])
def test_cluster_bounds_enclose_the_exact_masses(ab):
    images = _bank_images()
    engine = P.PatchPosterior(images, prune=True, clusters=12)
    bank = engine.bank(5, 0)
    assert isinstance(bank, P.ClusteredBank) and bank.index.clusters > 1
    x = _noisy(images, ab)
    q = P.extract_patches(x, 5, "circular").reshape(-1, 25)                 # [Q, D]
    a, s2 = P.noise_coefficients(torch.full((q.shape[0],), ab, dtype=torch.float64))
    upper, lower = pruning.cluster_bounds(q, a, s2, bank.index, bank.rep_keys, bank.rep_logw)
    exact, log_z = _exact_cluster_logmass(q, a, s2, bank)
    assert (upper >= exact - 1e-9).all()
    assert (lower <= log_z + 1e-9).all()


def test_every_key_lies_within_its_cluster_radius():
    images = _bank_images()
    bank = P.PatchPosterior(images, prune=True, clusters=10).bank(3, 0)
    keys, _, _ = bank.take(torch.arange(bank.num_keys))
    label = torch.repeat_interleave(torch.arange(bank.index.clusters), bank.index.sizes())
    dist = (keys.double() - bank.index.centroids[label]).norm(dim=-1)
    assert (dist <= bank.index.radii[label]).all()
    # the sorted bank is a permutation of the deduplicated bank: total multiplicity is N·H·W
    assert torch.logsumexp(bank.index.log_mass, 0).item() == pytest.approx(math.log(24 * 100), abs=1e-6)


@pytest.mark.parametrize("ab", [0.5, 0.95, 0.999])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pruned_posterior_is_within_its_reported_bound(ab, dtype):
    images = _bank_images()
    x = _noisy(images, ab).to(dtype)
    full = P.PatchPosterior(images, dtype=torch.float64, prune=False)(x.double(), ab, 5)
    engine = P.PatchPosterior(images, dtype=dtype, prune=True, clusters=16)
    pruned = engine(x, ab, 5).double()
    stats = engine.last_stats
    assert stats["neglected_bound"] <= 1e-6
    spread = float(images.max() - images.min())                              # value range of the centres
    float_err = 1e-5 if dtype == torch.float32 else 1e-12
    assert (pruned - full).abs().max() <= stats["neglected_bound"] * spread + float_err
    assert 0 < stats["pairs_evaluated"] <= stats["pairs_total"]


def test_pruning_skips_pairs_at_low_noise_and_bound_is_below_tolerance():
    images = _bank_images()
    engine = P.PatchPosterior(images, dtype=torch.float64, prune=True, clusters=24, prune_tolerance=1e-6)
    x = _noisy(images, 0.999)
    engine(x.double(), 0.999, 3)
    low = engine.last_stats
    unpruned = P.PatchPosterior(images, dtype=torch.float64, prune=False)
    unpruned(x.double(), 0.999, 3)
    assert low["pairs_evaluated"] < unpruned.last_stats["pairs_evaluated"]
    assert 0 < low["neglected_bound"] <= 1e-6
    assert len(engine.history) == 1 and 0 < low["fraction"] < 1


def test_select_clusters_keeps_the_skipped_sum_within_tolerance():
    g = torch.Generator().manual_seed(5)
    upper = torch.randn(50, 30, generator=g, dtype=torch.float64) * 10
    lower = torch.logsumexp(upper, -1) - 3.0                                  # any valid lower bound
    mask, bound = pruning.select_clusters(upper, lower, 1e-4)
    skipped = torch.logsumexp(upper.masked_fill(mask, -math.inf), -1)
    assert torch.allclose(torch.exp(skipped - lower), bound, rtol=1e-9, atol=0)
    assert (bound <= 1e-4).all() and mask.any(-1).all()
    assert (~mask).any()                                                      # something was skipped


def test_streamed_bank_clusters_like_the_cached_one():
    images = _bank_images(n=10)
    x = _noisy(images, 0.97)
    cached = P.PatchPosterior(images, dtype=torch.float64, prune=True, cache=True, clusters=8)
    streamed = P.PatchPosterior(images, dtype=torch.float64, prune=True, cache=False, clusters=8)
    out_c, out_s = cached(x.double(), 0.97, 3), streamed(x.double(), 0.97, 3)
    assert not streamed.bank(3, 0).held and cached.bank(3, 0).held
    full = P.PatchPosterior(images, dtype=torch.float64)(x.double(), 0.97, 3)
    assert (out_c - full).abs().max() <= 2e-6 and (out_s - full).abs().max() <= 2e-6


def test_provenance_survives_the_cluster_order():
    images = _bank_images()
    x = images[3:4].roll(shifts=(2, 1), dims=(2, 3))
    _, prov = P.PatchPosterior(images, prune=True, clusters=8)(x, 0.99999, 3, return_provenance=True)
    _, ref = P.PatchPosterior(images, prune=False)(x, 0.99999, 3, return_provenance=True)
    # identical patches may come from another image: compare the patches they point at
    src = P.extract_patches(images, 3, "circular")
    pick = lambda p: src[p[..., 0], p[..., 1] * 10 + p[..., 2]]                # noqa: E731
    assert torch.equal(pick(prov), pick(ref))


def test_bad_pruning_options_are_clear_errors():
    images = _bank_images(n=2)
    with pytest.raises(P.PatchConfigError, match="prune"):
        P.PatchPosterior(images, prune="yes")
    with pytest.raises(ValueError, match="tolerance"):
        P.PatchPosterior(images, prune=True, prune_tolerance=0.0)
    with pytest.raises(P.PatchConfigError, match="clusters"):
        P.PatchPosterior(images, prune=True, clusters=0)


def test_hash_dedup_matches_row_sort():
    g = torch.Generator().manual_seed(6)
    keys = torch.randint(0, 3, (500, 4), generator=g).float()
    first, inverse = P.unique_rows(keys)
    assert torch.equal(keys[first][inverse], keys)
    assert first.shape[0] == torch.unique(keys, dim=0).shape[0]
