"""The box-sum kernel against the float64 brute force, and its place in the engine."""
import math

import pytest
import torch

import scorefield as sf
from scorefield.engine import BOX_MIN_PATCH, PatchConfigError, PatchPosterior
from scorefield.engine import box as boxkernel

needs_kernel = pytest.mark.skipif(not boxkernel.available(), reason="no C++ compiler for the box-sum kernel")


def noisy(images: torch.Tensor, b: int, alpha_bar: float, gen: torch.Generator) -> torch.Tensor:
    pick = torch.randint(images.shape[0], (b,), generator=gen)
    return math.sqrt(alpha_bar) * images[pick] + math.sqrt(1 - alpha_bar) * torch.randn(
        b, *images.shape[1:], generator=gen)


@needs_kernel
@pytest.mark.parametrize("c,h,w,p", [(1, 8, 8, 3), (1, 9, 12, 5), (3, 10, 10, 7), (2, 7, 17, 5), (1, 16, 16, 15),
                                     # W ≡ 4 (mod 8), H even: lanes over two vertical shifts (no padding)
                                     (1, 10, 12, 5), (3, 8, 20, 7), (2, 6, 4, 3), (1, 28, 28, 15)])
@pytest.mark.parametrize("alpha_bar", [0.05, 0.6, 0.99, 0.9999])
def test_matches_float64_reference(c, h, w, p, alpha_bar):
    gen = torch.Generator().manual_seed(hash((c, h, w, p, alpha_bar)) % 2**31)
    images = torch.rand(4, c, h, w, generator=gen) * 2 - 1
    logw = torch.randn(4, generator=gen, dtype=torch.float64)
    x = noisy(images, 3, alpha_bar, gen)
    ab = torch.tensor([alpha_bar, alpha_bar, min(0.5, alpha_bar)], dtype=torch.float64)  # mixed noise per sample
    got = boxkernel.box_posterior(x, ab, images, p, log_weights=logw)
    want = boxkernel.box_posterior_reference(x, ab, images, logw, p)
    assert (got.mean - want).abs().max() < 1e-5
    # the certified bounds bound the error: skipped mass m moves a mean of values in [−1, 1] by ≤ 2m, and a
    # logit error ≤ δ moves it by ≤ 2·(e^{2δ} − 1) ≈ 4δ
    bound = 2 * got.neglected_bound + 2 * math.expm1(2 * got.logit_error_bound) + 1e-6
    assert (got.mean - want).abs().max() <= bound
    assert got.folded + got.skipped == 3 * h * w * 4 * h * w


@needs_kernel
@pytest.mark.parametrize("h,w", [(9, 11), (10, 12)])   # padded lanes; lanes over two vertical shifts
def test_provenance_is_the_nearest_weighted_patch_and_chunks_do_not_matter(h, w):
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(5, 1, h, w, generator=gen) * 2 - 1
    x = noisy(images, 2, 0.999, gen)
    whole = boxkernel.box_posterior(x, 0.999, images, 5, provenance=True)
    chunked = boxkernel.box_posterior(x, 0.999, images, 5, provenance=True, chunk_images=2)
    assert torch.equal(whole.best, chunked.best)
    assert (whole.mean - chunked.mean).abs().max() < 1e-7
    pad = 2
    keys = torch.nn.functional.unfold(torch.nn.functional.pad(images.double(), (pad,) * 4, mode="circular"), 5)
    queries = torch.nn.functional.unfold(torch.nn.functional.pad(x.double(), (pad,) * 4, mode="circular"), 5)
    dist = torch.cdist(queries.transpose(1, 2), math.sqrt(0.999) * keys.transpose(1, 2).reshape(1, -1, 25))
    nearest = dist.argmin(-1).reshape(2, h, w)                                          # n·H·W + y·W + x
    flat = (whole.best[..., 0] * h + whole.best[..., 1]) * w + whole.best[..., 2]
    assert torch.equal(flat, nearest)


@needs_kernel
def test_skipping_is_certified_against_a_full_pass():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(6, 1, 12, 12, generator=gen).round() * 2 - 1     # ±1 pixels: many far-apart patches
    x = noisy(images, 2, 0.97, gen)
    ab = torch.full((2,), 0.97, dtype=torch.float64)
    exact = boxkernel.box_posterior_reference(x, ab, images, torch.zeros(6, dtype=torch.float64), 5)
    for tol in (1e-6, 1e-3):
        got = boxkernel.box_posterior(x, 0.97, images, 5, tolerance=tol)
        assert got.skipped > got.folded > 0
        assert got.neglected_bound == pytest.approx(tol)
        assert (got.mean - exact).abs().max() <= 2 * tol + 1e-6        # values in [-1, 1]: |Δmean| ≤ 2·mass


def test_threshold_and_coverage_rules():
    assert boxkernel.threshold_for(1000, 1e-6) == pytest.approx(math.log(1000) + math.log(1e6))
    with pytest.raises(ValueError, match="tolerance"):
        boxkernel.threshold_for(10, 0.0)
    assert boxkernel.covers((3, 1, 28, 28), 15)
    assert not boxkernel.covers((3, 1, 28, 28), 4)          # even
    assert not boxkernel.covers((3, 1, 9, 28), 11)          # larger than H
    assert not boxkernel.covers((3, 1, 8, 65), 3)           # wider than the lanes cover
    with pytest.raises(ValueError, match="odd P"):
        boxkernel.box_posterior(torch.zeros(1, 1, 8, 8), 0.5, torch.zeros(2, 1, 8, 8), 9)


@needs_kernel
def test_engine_box_path_matches_float64_engine_and_reports_it():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(7, 1, 10, 10, generator=gen) * 2 - 1
    x = noisy(images, 3, 0.8, gen)
    exact = PatchPosterior(images, dtype=torch.float64)
    for cross in ("box", "auto"):
        engine = PatchPosterior(images, cross_term=cross)
        got = engine(x, 0.8, BOX_MIN_PATCH)
        assert engine.last_stats["cross_term"] == "box"
        assert (got.double() - exact(x.double(), 0.8, BOX_MIN_PATCH)).abs().max() < 1e-5
    auto = PatchPosterior(images)
    auto(x, 0.8, 3)
    assert auto.unique_fraction(3) == 1.0 and auto.last_stats["cross_term"] == "box"   # no duplicates to merge
    sparse = sparse_images(7, 1, 10, 10, gen)
    auto = PatchPosterior(sparse)
    auto(x, 0.8, 3)
    assert auto.unique_fraction(3) < 0.5 and auto.last_stats["cross_term"] == "gemm"   # deduplicated GEMM path
    gemm = PatchPosterior(images, cross_term="gemm")
    gemm(x, 0.8, 9)
    assert gemm.last_stats["cross_term"] == "gemm"
    out, prov = PatchPosterior(images, cross_term="box")(x, 0.8, 7, return_provenance=True)
    assert prov.shape == (3, 10, 10, 3) and int(prov[..., 0].max()) < 7 and int(prov.min()) >= 0


def test_engine_refuses_box_where_it_does_not_apply():
    images = torch.rand(3, 1, 8, 8)
    with pytest.raises(PatchConfigError, match="cross_term must be"):
        PatchPosterior(images, cross_term="fft")
    with pytest.raises(PatchConfigError, match="shared circular bank"):
        PatchPosterior(images, grouping="border", padding="zeros", cross_term="box")(torch.rand(1, 1, 8, 8), 0.5, 3)
    engine = PatchPosterior(images, dtype=torch.float64)          # float64 is the reference: never box
    engine(torch.rand(1, 1, 8, 8, dtype=torch.float64), 0.5, 7)
    assert engine.last_stats["cross_term"] == "gemm"


@needs_kernel
def test_els_sampler_is_the_same_with_box_sums_and_gemm():
    data = sf.data.load("digits", subset=40, seed=0)
    noise = torch.randn(2, *data.images.shape[1:], generator=torch.Generator().manual_seed(0))
    runs = {}
    for cross in ("box", "gemm"):
        model = sf.models.make("els", data, patch_size=7, padding="circular", cross_term=cross)
        runs[cross] = sf.sampling.sample(model, noise, steps=12, sampler="ddim", schedule="cosine")
    assert (runs["box"] - runs["gemm"]).abs().max() < 1e-4


def sparse_images(n: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """A constant background (−1) with a few random strokes: many constant patches, as in MNIST."""
    images = torch.full((n, c, h, w), -1.0)
    for i in range(n):
        y, x = torch.randint(h - 3, (2,), generator=gen).tolist()
        images[i, :, y:y + 3, x:x + 2] = torch.rand(c, 3, 2, generator=gen) * 2 - 1
    return images


@needs_kernel
@pytest.mark.parametrize("alpha_bar", [0.1, 0.9, 0.9999])
@pytest.mark.parametrize("w", [13, 12])   # padded lanes; lanes over two vertical shifts
def test_constant_patches_merge_into_one_key_exactly(alpha_bar, w):
    gen = torch.Generator().manual_seed(int(alpha_bar * 1e4))
    images = sparse_images(5, 2, 12, w, gen)
    logw = torch.randn(5, generator=gen, dtype=torch.float64)
    x = noisy(images, 3, alpha_bar, gen)
    ab = torch.full((3,), alpha_bar, dtype=torch.float64)
    want = boxkernel.box_posterior_reference(x, ab, images, logw, 5)
    merged = boxkernel.box_posterior(x, ab, images, 5, log_weights=logw, provenance=True)
    plain = boxkernel.box_posterior(x, ab, images, 5, log_weights=logw, provenance=True, constant_value=None)
    assert boxkernel.most_frequent_value(images) == -1.0
    for got in (merged, plain):
        assert (got.mean - want).abs().max() < 1e-5
    assert merged.folded < plain.folded        # the constant patches are folded once per pixel, not one by one
    constant = boxkernel.constant_keys(images, logw, 5, -1.0)
    n, y, x_ = constant.first // (12 * w), constant.first // w % 12, constant.first % w
    window = torch.nn.functional.pad(images[n:n + 1], (2, 2, 2, 2), mode="circular")[0, :, y:y + 5, x_:x_ + 5]
    assert (window == -1).all()
    if alpha_bar == 0.9999:   # ties broken differently, but both name the same nearest patch content
        keys = torch.nn.functional.unfold(torch.nn.functional.pad(images, (2,) * 4, mode="circular"), 5)
        keys = keys.transpose(1, 2)                                                  # [N, H·W, C·25]

        def content(best):
            return keys[best[..., 0], best[..., 1] * w + best[..., 2]]
        assert torch.equal(content(merged.best), content(plain.best))


def test_circular_box_sum_is_the_window_sum():
    t = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    got = boxkernel.circular_box_sum(t, 5)
    want = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(t, (2, 2, 2, 2), mode="circular"), 5, 1) * 25
    assert torch.allclose(got, want, atol=1e-12)


@needs_kernel
def test_a_pixel_does_not_move_with_pixels_outside_its_patch(one_thread):
    # one thread: with several, which keys fall under the 1e-6 skip floor depends on the image order
    # each thread saw, a difference of up to the certified tolerance
    gen = torch.Generator().manual_seed(8)
    images = torch.rand(6, 1, 12, 12, generator=gen) * 2 - 1
    x = noisy(images, 1, 0.6, gen)
    far = x.clone()
    far[0, 0, 10, 10] += 1e-3                  # 6 pixels away (circularly) from (4, 4); P = 5 reaches 2
    base = boxkernel.box_posterior(x, 0.6, images, 5).mean
    moved = boxkernel.box_posterior(far, 0.6, images, 5).mean
    assert base[0, 0, 4, 4] == moved[0, 0, 4, 4]
    assert abs(base[0, 0, 10, 10] - moved[0, 0, 10, 10]) > 1e-6
