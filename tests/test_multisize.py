"""Every candidate patch size from one pass over the bank (engine/multisize.py, engine/multisize_route.py): the
one-pass x̂₀ per size against the float64 brute force and the single-size machine, and calibration's choice.

Tolerance against float64: x̂₀ is a convex combination of training pixels (|K| ≤ 1 here). A logit error ≤ δ on
every key moves each normalized weight by a factor within e^{±2δ}, so the mean by ≤ 2·(e^{2δ} − 1); skipped mass
η moves it by ≤ 2η; the float32 lane sums add ≤ 1e-6. δ is the fixed-point grid's bound (per size, reported by
the kernel), η the certified skip bound: tol = 2η + 2·(e^{2δ} − 1) + 1e-6. Against the single-size machine (its
own float32 route, GEMM or box sums) both sides are within float32 rounding of float64: 2e-5 absolute."""
import math

import numpy as np
import pytest
import torch

import scorefield as sf
import scorefield.models.machines as machines_module
from scorefield.engine import multisize
from scorefield.engine.multisize_route import MULTISIZE_MAX_LOGIT_ERROR, one_pass_sizes

needs_kernel = pytest.mark.skipif(not multisize.available(), reason="no C++ compiler for the multi-size kernel")
ALPHA_BARS = [1e-4, 0.3, 0.9, 0.999, 1 - 1e-6]


def noisy(images: torch.Tensor, b: int, alpha_bars: list[float], gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    pick = torch.randint(images.shape[0], (b,), generator=gen)
    ab = torch.tensor([alpha_bars[i % len(alpha_bars)] for i in range(b)], dtype=torch.float64)
    x = ab.sqrt()[:, None, None, None] * images[pick] + (1 - ab).sqrt()[:, None, None, None] * torch.randn(
        b, *images.shape[1:], generator=gen, dtype=torch.float64)
    return x.float(), ab


def tolerance(result: multisize.MultiSizeResult, k: int) -> float:
    return 2 * result.neglected_bound + 2 * math.expm1(2 * result.logit_error_bound[k]) + 1e-6


@needs_kernel
@pytest.mark.parametrize("c,h,w,sizes", [(1, 8, 8, [1, 3, 5, 7]), (2, 9, 12, [3, 5, 9]), (3, 7, 10, [3, 5, 7]),
                                         (1, 12, 9, [1, 3, 5, 7, 9]), (2, 6, 17, [3, 5])])
@pytest.mark.parametrize("alpha_bar", ALPHA_BARS[:4])
@pytest.mark.parametrize("padding", multisize.PADDINGS)
def test_one_pass_matches_the_float64_reference_at_every_size(c, h, w, sizes, alpha_bar, padding):
    gen = torch.Generator().manual_seed(hash((c, h, w, alpha_bar)) % 2**31)
    images = torch.rand(5, c, h, w, generator=gen) * 2 - 1
    logw = torch.randn(5, generator=gen, dtype=torch.float64)
    x, ab = noisy(images, 3, [alpha_bar, alpha_bar, 0.5], gen)          # mixed noise levels in one call
    got = multisize.multisize_posterior(x, ab, images, sizes, padding=padding, log_weights=logw)
    want = multisize.multisize_reference(x, ab, images, logw, sizes, padding)
    assert got.mean.shape == (len(sizes), 3, c, h, w) and got.sizes == sorted(sizes)
    for k in range(len(sizes)):
        err = float((got.mean[k] - want[k]).abs().max())
        assert err <= tolerance(got, k), (sizes[k], err, tolerance(got, k))
        if got.logit_error_bound[k] <= MULTISIZE_MAX_LOGIT_ERROR:      # where the route would take it
            assert err < 1e-5
        if padding == "circular":
            assert got.folded[k] + got.skipped[k] == 3 * h * w * 5 * h * w


@needs_kernel
def test_skipping_is_certified_and_chunks_do_not_matter():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(12, 1, 10, 10, generator=gen) * 2 - 1
    x, ab = noisy(images, 2, [0.95], gen)
    sizes = [3, 5, 7, 9]
    skipping = multisize.multisize_posterior(x, ab, images, sizes)
    chunked = multisize.multisize_posterior(x, ab, images, sizes, chunk_images=5)
    full = multisize.multisize_posterior(x, ab, images, sizes, tolerance=1e-300)
    assert sum(skipping.skipped) > 0 and skipping.neglected_bound <= 1e-6 * (1 + 1e-9)
    assert (skipping.mean - full.mean).abs().max() <= 2 * skipping.neglected_bound + 1e-6
    assert (chunked.mean - skipping.mean).abs().max() < 1e-6


@needs_kernel
@pytest.mark.parametrize("c,h,w,name,padding", [(1, 8, 8, "els", "circular"), (3, 6, 10, "els", "circular"),
                                                (1, 8, 8, "bbels", "zeros"), (2, 9, 7, "bbels", "zeros")])
def test_machine_one_pass_equals_the_single_size_machine(c, h, w, name, padding):
    gen = torch.Generator().manual_seed(c * 100 + h)
    data = sf.data.ImageSet(torch.rand(7, c, h, w, generator=gen) * 2 - 1, name="random")
    sizes = [3, 5] if min(h, w) < 7 else [3, 5, 7]
    machine = sf.models.make(name, data, patch_size=sizes[0], padding=padding)
    singles = {p: sf.models.make(name, data, patch_size=p, padding=padding) for p in sizes}
    for alpha_bar in ALPHA_BARS:
        x, ab = noisy(data.images, 3, [alpha_bar], gen)
        outs = machine.denoise_sizes(x, ab, None, sizes)
        engine = machine.engines.get(None)[0]
        assert list(outs) == one_pass_sizes(engine, x, ab, sizes)
        if alpha_bar < 0.99:
            assert list(outs) == sizes                                   # every size from the one pass
            assert engine.last_stats["cross_term"] == "box-multisize"
        want = multisize.multisize_reference(x, ab, data.images, None, sizes, padding)
        for p, out in outs.items():
            assert out.shape == x.shape and out.dtype == x.dtype
            assert (out - singles[p](x, ab)).abs().max() < 2e-5, (p, alpha_bar)
            assert (out.double() - want[sizes.index(p)]).abs().max() < 2e-5, (p, alpha_bar)


@needs_kernel
def test_low_noise_drops_the_largest_sizes_first_and_pure_noise_takes_the_shortcut():
    data = sf.data.load("digits", subset=20, seed=0)
    machine = sf.models.make("els", data, patch_size=3, padding="circular")
    engine = machine.engines.get(None)[0]
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 5, 7]
    kept = []
    for alpha_bar in (0.5, 0.999, 0.99999, 1 - 1e-9):
        x, ab = noisy(data.images, 2, [alpha_bar], gen)
        kept.append(one_pass_sizes(engine, x, ab, sizes))
    assert kept[0] == sizes and kept[-1] == []
    assert all(k == sizes[:len(k)] for k in kept)                     # prefixes: the largest go first
    assert [len(k) for k in kept] == sorted((len(k) for k in kept), reverse=True)
    noise = torch.randn(2, *data.images.shape[1:])
    assert one_pass_sizes(engine, noise, torch.full((2,), 1e-30, dtype=torch.float64), sizes) == []


def test_bad_input_is_refused_with_the_argument_named():
    images = torch.zeros(2, 1, 6, 6)
    with pytest.raises(ValueError, match="patch_sizes"):
        multisize.multisize_posterior(torch.zeros(1, 1, 6, 6), 0.5, images, [3, 4])
    with pytest.raises(ValueError, match="patch_sizes"):
        multisize.multisize_posterior(torch.zeros(1, 1, 6, 6), 0.5, images, [3, 7])
    with pytest.raises(ValueError, match="alike"):
        multisize.multisize_posterior(torch.zeros(1, 2, 6, 6), 0.5, images, [3])
    assert not multisize.covers((2, 5, 8, 8), [3]) and not multisize.covers((2, 1, 8, 80), [3])


def test_machines_without_the_route_answer_nothing():
    data = sf.data.load("digits", subset=10, seed=0)
    x = torch.zeros(1, *data.images.shape[1:])
    cases = [("ls", "zeros", {}), ("ls", "circular", {}), ("els", "circular", {"valid_only": True}),
             ("els", "circular", {"dtype": "float64"})]
    for name, padding, options in cases:
        machine = sf.models.make(name, data, patch_size=3, padding=padding, **options)
        assert machine.denoise_sizes(x, 0.5, None, [3, 5]) == {}
    conditional = sf.models.make("els", data, patch_size=3, padding="circular", conditional=True)
    assert conditional.denoise_sizes(x, 0.5, None, [3, 5]) == {}


@needs_kernel
@pytest.mark.parametrize("name,padding", [("els", "circular"), ("bbels", "zeros")])
def test_calibration_chooses_the_same_sizes_as_the_per_size_loop(tmp_path, monkeypatch, name, padding):
    digits = sf.data.load("digits", subset=40, seed=0)
    network = sf.models.make(name, digits, patch_size=[3, 3, 5, 5, 7, 7], padding=padding)
    kwargs = dict(machine=name, padding=padding, patch_sizes=[3, 5, 7], seeds=range(3), steps=6, progress=False)
    one = sf.experiments.calibrate(network, digits, out=tmp_path, name="one", **kwargs)
    monkeypatch.setattr(machines_module.PatchMachine, "denoise_sizes", lambda *a: {})
    loop = sf.experiments.calibrate(network, digits, out=tmp_path, name="loop", **kwargs)
    assert one.chosen == loop.chosen and one.patch_sizes == loop.patch_sizes
    np.testing.assert_allclose(one.cosine, loop.cosine, atol=1e-5, rtol=0)
    routes = sf.experiments.engine_log.read(sf.runs.RunDir.open(one.run_dir))
    assert any(r.get("cross_term") == "box-multisize" and r.get("patch_size") == [3, 5, 7] for r in routes)
    assert not any(r.get("cross_term") == "box-multisize"
                   for r in sf.experiments.engine_log.read(sf.runs.RunDir.open(loop.run_dir)))
