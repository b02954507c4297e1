"""The patch-posterior engine against a brute-force transcription of kamb-ganguli eq. 8, 10 and 41."""
import math

import pytest
import torch
import torch.nn.functional as F

import scorefield.engine as P
from scorefield.engine import kernels


def _padded(images, r, padding):
    mode = "circular" if padding == "circular" else "constant"
    return F.pad(images, (r, r, r, r), mode=mode) if r else images


def _border_class(y, x, h, w, r):
    return (min(y, r), min(x, r), min(h - 1 - y, r), min(w - 1 - x, r))


def brute_force(x, alpha_bar, images, patch, padding, grouping, valid_only=False):
    """x̂₀ pixel by pixel from the definitions, float64, with explicit loops over bank patches."""
    x, images = x.double(), images.double()
    b, c, h, w = x.shape
    r = patch // 2
    xp, ip = _padded(x, r, padding), _padded(images, r, padding)
    out = torch.zeros_like(x)
    for s in range(b):
        a, s2 = math.sqrt(alpha_bar[s]), 1 - alpha_bar[s]
        for y in range(h):
            for xx in range(w):
                q = xp[s, :, y:y + patch, xx:xx + patch]
                logits, centres = [], []
                for n in range(images.shape[0]):
                    for ky in range(h):
                        for kx in range(w):
                            if grouping == "location" and (ky, kx) != (y, xx):
                                continue
                            if grouping == "border" and _border_class(ky, kx, h, w, r) != \
                                    _border_class(y, xx, h, w, r):
                                continue
                            if valid_only and not (r <= ky < h - r and r <= kx < w - r):
                                continue
                            k = ip[n, :, ky:ky + patch, kx:kx + patch]
                            logits.append(-((q - a * k) ** 2).sum() / (2 * s2))
                            centres.append(images[n, :, ky, kx])
                wts = torch.softmax(torch.stack(logits), 0)
                out[s, :, y, xx] = (wts[:, None] * torch.stack(centres)).sum(0)
    return out


def _data(n=3, c=1, h=5, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1, torch.randn(2, c, h, w, generator=g)


@pytest.mark.parametrize("grouping,padding,valid_only", [
    ("shared", "circular", False), ("shared", "circular", True), ("location", "zeros", False),
    ("location", "circular", False), ("border", "zeros", False)])
@pytest.mark.parametrize("patch", [3, 5])
def test_engine_matches_brute_force(grouping, padding, valid_only, patch):
    images, x = _data(c=1 if patch == 5 else 3)
    ab = [0.4, 0.9]
    engine = P.PatchPosterior(images, grouping=grouping, padding=padding, valid_only=valid_only,
                              dtype=torch.float64)
    expected = brute_force(x, ab, images, patch, padding, grouping, valid_only)
    assert torch.allclose(engine(x.double(), torch.tensor(ab), patch), expected, atol=1e-10)


@pytest.mark.parametrize("grouping,padding", [("shared", "circular"), ("location", "zeros"),
                                              ("border", "zeros"), ("shared", "zeros")])
@pytest.mark.parametrize("channels", [1, 3])
def test_float32_fast_path_matches_float64_reference(grouping, padding, channels):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(12, channels, 9, 9, generator=g) * 2 - 1
    clean = torch.rand(5, channels, 9, 9, generator=g) * 2 - 1
    ab = torch.tensor([0.2, 0.9, 0.99, 0.999, 0.9999], dtype=torch.float64)
    x = (ab.sqrt()[:, None, None, None] * clean
         + (1 - ab).sqrt()[:, None, None, None] * torch.randn(clean.shape, generator=g)).float().double()
    fast = P.PatchPosterior(images, grouping=grouping, padding=padding)
    ref = P.PatchPosterior(images, grouping=grouping, padding=padding, dtype=torch.float64)
    for patch in (3, 5, 7, 9):
        err = (fast(x.float(), ab, patch).double() - ref(x, ab, patch)).abs().max().item()
        assert err < 1e-5, f"P={patch}: float32 error {err:.2e}"


def test_topk_fix_is_needed_and_works_at_low_noise():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(20, 3, 12, 12, generator=g) * 2 - 1
    clean = torch.rand(3, 3, 12, 12, generator=g) * 2 - 1
    ab = 0.9999
    x = math.sqrt(ab) * clean + math.sqrt(1 - ab) * torch.randn(clean.shape, generator=g)   # float32
    ref = P.PatchPosterior(images, dtype=torch.float64)(x.double(), ab, 11)
    fixed = P.PatchPosterior(images)(x, ab, 11).double()
    naive = P.PatchPosterior(images, topk=0)(x, ab, 11).double()
    assert (fixed - ref).abs().max() < 1e-4
    assert (naive - ref).abs().max() > 10 * (fixed - ref).abs().max()


@pytest.mark.parametrize("grouping,padding", [("shared", "circular"), ("location", "zeros"), ("border", "zeros")])
def test_result_independent_of_chunking_and_caching(grouping, padding):
    images, x = _data(n=7, c=2, h=6, w=7)
    ab = torch.tensor([0.5, 0.97])
    runs = [P.PatchPosterior(images, grouping=grouping, padding=padding, dtype=torch.float64, cache=cache,
                             chunk_images=chunk)(x.double(), ab, 3)
            for cache, chunk in [(True, None), (False, 1), (False, 3), (False, None)]]
    for r in runs[1:]:
        assert torch.allclose(r, runs[0], atol=1e-12)


def test_uneven_query_blocks_and_key_chunks_normalize_globally():
    images, x = _data(n=5, c=1, h=7, w=7)
    ab = torch.tensor([0.6, 0.95])
    a, s2 = P.noise_coefficients(ab)
    gb = P.group_layout("shared", 7, 7, 3)[0]
    q = P.extract_patches(x.double(), 3, "circular")[:, gb.query_locs[0]].reshape(1, -1, 9)
    a_q, s2_q = a.repeat_interleave(49)[None], s2.repeat_interleave(49)[None]
    whole = P.softmax_posterior(q, a_q, s2_q, P.StreamedPatches(images, torch.zeros(5), 3, "circular",
                                                                 gb.key_locs), dtype=torch.float64)[0]
    # a tiny budget forces small query blocks and key chunks of uneven size (49·5 keys in chunks of 49·k)
    src = P.StreamedPatches(images, torch.zeros(5), 3, "circular", gb.key_locs)
    small = P.softmax_posterior(q, a_q, s2_q, src, dtype=torch.float64, chunk_keys=98, memory_budget=2e6)[0]
    assert torch.allclose(small, whole, atol=1e-12)


def test_dedup_is_exact_and_shrinks_the_bank():
    images = torch.sign(torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3)) - 0.5)
    images[2:] = images[:2]                                    # every image twice
    twice = P.PatchPosterior(images, dtype=torch.float64, cache=True)
    once = P.PatchPosterior(images[:2], dtype=torch.float64, log_weights=torch.full((2,), math.log(2)),
                            cache=False)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(4)).double()
    assert torch.allclose(twice(x, 0.7, 3), once(x, 0.7, 3), atol=1e-12)
    bank = twice.bank(3, 0)
    assert isinstance(bank, P.CachedBank) and bank.num_keys < 4 * 36
    assert torch.allclose(torch.logsumexp(bank.logw.double(), -1), torch.tensor([math.log(4 * 36)],
                                                                                dtype=torch.float64))


def test_border_classes_follow_fig9():
    cls = P.border_classes(9, 9, 5).reshape(9, 9, 4)
    flat = cls.reshape(-1, 4)
    same = (flat[:, None] == flat[None]).all(-1)               # [81, 81]
    assert same[0].sum() == 1                                  # corner: only itself
    assert same[0 * 9 + 4].sum() == 5                          # top edge row 0: x in [2, 6]
    assert same[4 * 9 + 4].sum() == 25                         # interior: the 5×5 block of full patches
    batches = P.group_layout("border", 9, 9, 5)
    assert sum(gb.query_locs.numel() for gb in batches) == 81


def test_bbels_corner_uses_only_its_own_location():
    # every training patch is the same except at the corner; the corner pixel's provenance must be (·, 0, 0)
    images, x = _data(n=4, c=1, h=7, w=7)
    engine = P.PatchPosterior(images, grouping="border", padding="zeros")
    _, prov = engine(x, torch.tensor([0.3, 0.99]), 5, return_provenance=True)
    assert (prov[:, 0, 0, 1:] == 0).all() and (prov[:, 6, 6, 1:] == 6).all()
    assert (prov[:, 0, 3, 1] == 0).all()                       # top edge: same row
    # the corner's value is then a posterior over the corner pixels of the training images only
    corner = torch.full((1, 1, 7, 7), 0.0)
    imgs = torch.zeros(2, 1, 7, 7)
    imgs[0, 0, 0, 0], imgs[1, 0] = 1.0, 0.5
    imgs[1, 0, 0, 0] = -1.0
    out = P.PatchPosterior(imgs, grouping="border", padding="zeros", dtype=torch.float64)(corner.double(), 0.0, 5)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.0, abs=1e-12)   # mean of +1 and −1, nothing else


def test_provenance_points_at_the_nearest_patch_at_low_noise():
    images, _ = _data(n=4, c=1, h=6, w=6)
    x = images[2:3].roll(shifts=(1, 2), dims=(2, 3))            # a translate of training image 2
    _, prov = P.PatchPosterior(images)(x, 0.99999, 3, return_provenance=True)
    assert (prov[..., 0] == 2).all()
    assert ((prov[0, 3, 4, 1:] - torch.tensor([2, 2])) == 0).all()


def test_memory_estimate_refuses_before_starting():
    images, x = _data(n=3, c=1, h=8, w=8)
    engine = P.PatchPosterior(images, memory_budget=10_000, cross_term="gemm")
    with pytest.raises(P.PatchMemoryError, match="MiB"):
        engine(x, 0.5, 7)
    with pytest.raises(ValueError):                            # also a ValueError for the CLI
        P.PatchPosterior(images, chunk_images=2, memory_budget=2e5, cache=False, cross_term="gemm")(x, 0.5, 7)
    with pytest.raises(P.PatchMemoryError, match="box-sum"):  # the box-sum path checks its own (small) need
        P.PatchPosterior(images, memory_budget=10_000, cross_term="box")(x, 0.5, 7)


def test_bad_configuration_is_a_clear_error():
    images, x = _data()
    with pytest.raises(P.PatchConfigError, match="odd"):
        P.PatchPosterior(images)(x, 0.5, 4)
    with pytest.raises(P.PatchConfigError, match="padding"):
        P.PatchPosterior(images, padding="reflect")
    with pytest.raises(P.PatchConfigError, match="valid_only"):
        P.group_layout("location", 5, 5, 3, valid_only=True)


def test_engine_calls_the_public_accumulate(monkeypatch):
    calls = []
    original = kernels.accumulate

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "accumulate", spy)
    images, x = _data()
    P.PatchPosterior(images, cross_term="gemm")(x, 0.5, 3)
    assert calls


def test_flat_logits_give_the_prior_mean_without_folding():
    images, x = _data(n=4, c=2, h=6, w=6)
    engine = P.PatchPosterior(images, dtype=torch.float64)
    out = engine(x.double(), 1e-30, 3)
    expected = images.double().mean(dim=(0, 2, 3))                # every pixel is one patch centre
    assert torch.allclose(out, expected[None, :, None, None].expand_as(out), atol=1e-12)
    assert engine.last_stats["pairs_evaluated"] == 0 and engine.last_stats["neglected_bound"] < 1e-12
    # at a noise level where the logits are not flat the engine folds every key
    engine(x.double(), 1e-3, 3)
    assert engine.last_stats["pairs_evaluated"] > 0


def test_prior_mean_shortcut_equals_the_folded_bank_with_weights():
    images, _ = _data(n=5, c=2, h=6, w=7)
    logw = torch.randn(5, dtype=torch.float64)
    shortcut = P.PatchPosterior(images, log_weights=logw, dtype=torch.float64).prior_mean(5, 0)
    folded = P.PatchPosterior(images, log_weights=logw, dtype=torch.float64, grouping="location",
                              padding="circular").prior_mean(5, 0).mean(0)   # per location: same pixel means
    assert torch.allclose(shortcut[0], folded, atol=1e-12)


def test_float32_norm_column_does_not_degrade_the_float64_bank():
    images, x = _data(n=3, c=3, h=5, w=5)
    cached = P.PatchPosterior(images, dtype=torch.float64, cache=True)(x.double(), 0.9, 3)
    streamed = P.PatchPosterior(images, dtype=torch.float64, cache=False)(x.double(), 0.9, 3)
    assert torch.allclose(cached, streamed, atol=1e-12, rtol=0)


def _sparse_images(n=10, c=1, h=8, w=8, seed=3):
    """Images mostly −1 with a few bright pixels: many identical patches."""
    g = torch.Generator().manual_seed(seed)
    images = -torch.ones(n, c, h, w)
    for i in range(n):
        ys, xs = torch.randint(0, h, (2,), generator=g), torch.randint(0, w, (2,), generator=g)
        images[i, :, ys, xs] = torch.rand(2, generator=g) * 2 - 1
    images[n // 2:] = images[:n - n // 2]                      # whole duplicated images too
    return images


def _patch_at(images, prov, patch, padding):
    r = patch // 2
    ip = _padded(images.double(), r, padding)
    flat = prov.reshape(-1, 3)
    return torch.stack([ip[i, :, y:y + patch, x:x + patch].reshape(-1) for i, y, x in flat.tolist()])


@pytest.mark.parametrize("grouping,padding", [("shared", "circular"), ("location", "zeros"), ("border", "zeros")])
@pytest.mark.parametrize("chunk_images", [3, 10])
def test_streamed_dedup_matches_plain_stream_float64(grouping, padding, chunk_images):
    images = _sparse_images()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    logw = torch.linspace(-0.5, 0.5, images.shape[0])
    ab = torch.tensor([0.3, 0.95])
    kw = dict(grouping=grouping, padding=padding, dtype=torch.float64, cache=False, chunk_images=chunk_images,
              log_weights=logw)
    plain = P.PatchPosterior(images, stream_dedup=False, **kw)
    merged = P.PatchPosterior(images, stream_dedup=True, **kw)
    ref, ref_prov = plain(x, ab, 3, return_provenance=True)
    got, got_prov = merged(x, ab, 3, return_provenance=True)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert merged.last_stats["pairs_evaluated"] <= plain.last_stats["pairs_evaluated"]
    if grouping == "shared":
        assert merged.last_stats["pairs_evaluated"] < plain.last_stats["pairs_evaluated"]
    assert merged.last_stats["pairs_total"] == plain.last_stats["pairs_total"]
    if chunk_images == images.shape[0]:   # one chunk: the same first occurrences as the cached bank
        cached = P.PatchPosterior(images, grouping=grouping, padding=padding, dtype=torch.float64, cache=True,
                                  log_weights=logw)
        out, prov = cached(x, ab, 3, return_provenance=True)
        assert torch.allclose(got, out, rtol=0, atol=1e-6)   # the cached bank holds float32 log-weights
        assert torch.equal(got_prov, prov)
    # without noise the arg-max patch is the nearest one (the query's own), the same up to identical copies
    low = torch.tensor([1.0, 1.0])
    near = images[[1, 2]].double()
    _, ref_prov = plain(near, low, 3, return_provenance=True)
    _, got_prov = merged(near, low, 3, return_provenance=True)
    assert torch.equal(_patch_at(images, got_prov, 3, padding), _patch_at(images, ref_prov, 3, padding))


@pytest.mark.parametrize("patch", [3, 5])
def test_streamed_dedup_float32_topk_fix_at_low_noise(patch):
    images = _sparse_images()
    g = torch.Generator().manual_seed(5)
    ab = torch.tensor([0.9999, 0.9999, 0.9])
    x = (ab.sqrt()[:, None, None, None] * images[[0, 3, 7]]
         + (1 - ab).sqrt()[:, None, None, None] * torch.randn(3, 1, 8, 8, generator=g))
    logw = torch.linspace(-0.3, 0.3, images.shape[0])
    kw = dict(cache=False, chunk_images=4, log_weights=logw)
    exact = P.PatchPosterior(images, dtype=torch.float64, stream_dedup=False, **kw)
    plain = P.PatchPosterior(images, stream_dedup=False, **kw)
    merged = P.PatchPosterior(images, stream_dedup=True, **kw)
    ref = exact(x.double(), ab, patch)
    base, _ = plain(x, ab, patch, return_provenance=True)
    got, got_prov = merged(x, ab, patch, return_provenance=True)
    assert (got.double() - ref).abs().max() <= max(2e-6, 2 * float((base.double() - ref).abs().max()))
    assert torch.allclose(got, merged(x, ab, patch), rtol=0, atol=0)
    # the arg-max is over merged keys (as for a cached bank): the float64 merged stream picks the same ones
    exact_merged = P.PatchPosterior(images, dtype=torch.float64, stream_dedup=True, **kw)
    ref_merged, ref_merged_prov = exact_merged(x.double(), ab, patch, return_provenance=True)
    assert torch.allclose(ref_merged, ref, rtol=0, atol=1e-12)
    assert torch.equal(got_prov, ref_merged_prov)
    assert merged.last_stats["pairs_evaluated"] < plain.last_stats["pairs_evaluated"]
