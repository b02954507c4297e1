"""The torch box-sum posterior (`engine.box_torch`) against the float64 brute force, the ES machine, its refusals,
its gradients, and CUDA against the CPU."""
import math

import pytest
import torch

import scorefield as sf
from scorefield.engine import PatchConfigError, PatchMemoryError
from scorefield.engine.box import box_posterior_reference
from scorefield.engine.box_torch import box_posterior_torch, chunk_bytes, window_sums

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny problems: thread barriers cost more than they save

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def problem(c: int, h: int, w: int, n: int, alpha_bar: float, seed: int):
    """Training images in [-1, 1], log-weights, and three queries: two noisy training images at ᾱ and one
    standard-normal image far from every key, with mixed ᾱ = [ᾱ, ᾱ, 0.5]."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, c, h, w, generator=gen) * 2 - 1
    logw = torch.randn(n, generator=gen, dtype=torch.float64)
    pick = torch.randint(n, (2,), generator=gen)
    noisy = math.sqrt(alpha_bar) * images[pick] + math.sqrt(1 - alpha_bar) * torch.randn(2, c, h, w, generator=gen)
    x = torch.cat([noisy, torch.randn(1, c, h, w, generator=gen)])
    ab = torch.tensor([alpha_bar, alpha_bar, 0.5], dtype=torch.float64)
    return x, ab, images, logw


@pytest.mark.parametrize("c,h,w,p", [(1, 7, 10, 1), (1, 7, 10, 3), (3, 7, 10, 5), (1, 7, 10, 7), (3, 8, 6, 5),
                                     (2, 9, 9, 9), (1, 6, 11, 5)])
@pytest.mark.parametrize("alpha_bar", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_matches_float64_reference(c, h, w, p, alpha_bar, dtype):
    x, ab, images, logw = problem(c, h, w, 5, alpha_bar, seed=hash((c, h, w, p, alpha_bar)) % 2**31)
    want = box_posterior_reference(x, ab, images, logw, p)
    got = box_posterior_torch(x.to(dtype), ab, images.to(dtype), p, log_weights=logw, chunk_images=2, dtype=dtype)
    assert got.shape == x.shape and got.dtype == dtype
    assert (got.double() - want).abs().max() <= TOLERANCE[dtype]


def test_float32_far_queries_at_low_noise():
    """Standard-normal queries far from every key at ᾱ = 0.95 have logits ~5000: plain float32 window sums of the
    squares err by ~2e-4 in the mean there; the fixed-point split keeps it near 1e-5."""
    worst = 0.0
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(4, 3, 11, 11, generator=gen) * 2 - 1
        x = torch.randn(3, 3, 11, 11, generator=gen)
        ab = torch.full((3,), 0.95, dtype=torch.float64)
        want = box_posterior_reference(x, ab, images, torch.zeros(4, dtype=torch.float64), 11)
        worst = max(worst, float((box_posterior_torch(x, ab, images, 11).double() - want).abs().max()))
    assert worst < 5e-5


def test_chunking_and_weights_matter_as_they_should():
    x, ab, images, logw = problem(2, 7, 9, 5, 0.7, seed=5)
    whole = box_posterior_torch(x, ab, images, 5, log_weights=logw, dtype=torch.float64)
    for chunk in (1, 2, 3, 5, 8):                                      # 5 images in chunks that do not divide it
        chunked = box_posterior_torch(x, ab, images, 5, log_weights=logw, chunk_images=chunk, dtype=torch.float64)
        assert (chunked - whole).abs().max() < 1e-12
    uniform = box_posterior_torch(x, ab, images, 5, dtype=torch.float64)
    assert (uniform - whole).abs().max() > 1e-3                        # the log-weights are used
    shifted = box_posterior_torch(x, ab, images, 5, log_weights=logw + 3.0, dtype=torch.float64)
    assert (shifted - whole).abs().max() < 1e-12                       # ... and only up to a constant
    scalar = box_posterior_torch(x, 0.7, images, 5, log_weights=logw, dtype=torch.float64)
    per_sample = box_posterior_torch(x, torch.full((3,), 0.7, dtype=torch.float64), images, 5, log_weights=logw,
                                     dtype=torch.float64)
    assert torch.equal(scalar, per_sample)


def test_whole_image_patch_is_the_es_machine():
    """ELS with a patch as large as an odd-sized image and circular padding compares all circular translates of
    every training image: the ES machine."""
    gen = torch.Generator().manual_seed(7)
    images = torch.rand(4, 2, 7, 7, generator=gen) * 2 - 1
    x = torch.randn(3, 2, 7, 7, generator=gen, dtype=torch.float64)
    ab = torch.tensor([0.1, 0.6, 0.97], dtype=torch.float64)
    es = sf.models.make("es", sf.data.ImageSet(images), dtype="float64")
    want = es(x, ab)
    assert (box_posterior_torch(x, ab, images, 7, dtype=torch.float64) - want).abs().max() < 1e-10
    assert (box_posterior_torch(x.float(), ab.float(), images, 7).double() - want).abs().max() < 1e-4


def test_running_window_sums_are_circular_box_sums():
    gen = torch.Generator().manual_seed(2)
    t = torch.rand(3, 9, 4, generator=gen, dtype=torch.float64)
    for p in (1, 3, 5, 9):
        want = sum(t.roll(j, 1) for j in range(-(p // 2), p // 2 + 1))
        assert torch.allclose(window_sums(t, p, 1), want, atol=1e-13)
        out = torch.empty_like(t)
        assert torch.allclose(window_sums(t, p, 1, out), want, atol=1e-13)
    integers = torch.randint(0, 2**21, (2, 7, 3), generator=gen).to(torch.float32)
    exact = sum(integers.roll(j, 1) for j in range(-2, 3))              # window sums < 2^24: exact in float32
    assert torch.equal(window_sums(integers, 5, 1, torch.empty_like(integers)), exact)


def test_memory_refusal_and_budget():
    x, ab, images, _ = problem(1, 8, 8, 6, 0.5, seed=1)
    one = chunk_bytes(3, 1, 1, 8, 8, 4)
    with pytest.raises(PatchMemoryError, match="MiB"):
        box_posterior_torch(x, ab, images, 3, memory_budget=one - 1)
    with torch.no_grad():
        fits = box_posterior_torch(x, ab, images, 3, memory_budget=one)    # one image per chunk fits
    want = box_posterior_reference(x, ab, images, torch.zeros(6, dtype=torch.float64), 3)
    assert (fits.double() - want).abs().max() < 1e-4
    xg = x.clone().requires_grad_()                                    # a differentiable call keeps every chunk
    with pytest.raises(PatchMemoryError, match="differentiable"):
        box_posterior_torch(xg, ab, images, 3, memory_budget=5 * chunk_bytes(3, 1, 1, 8, 8, 4, True))


@pytest.mark.parametrize("p,match", [(4, "odd"), (0, "odd"), (9, "min"), (2.5, "odd"), (True, "odd")])
def test_bad_patch_size_is_refused(p, match):
    x, ab, images, _ = problem(1, 8, 9, 3, 0.5, seed=0)
    with pytest.raises(PatchConfigError, match=match):
        box_posterior_torch(x, ab, images, p)


def test_bad_inputs_are_refused():
    x, ab, images, logw = problem(1, 8, 8, 3, 0.5, seed=0)
    with pytest.raises(PatchConfigError, match="channels or size"):
        box_posterior_torch(x, ab, images[:, :, :, :7], 3)
    with pytest.raises(PatchConfigError, match="channels or size"):
        box_posterior_torch(x, ab, images.expand(3, 2, 8, 8), 3)
    with pytest.raises(PatchConfigError, match="NaN"):
        box_posterior_torch(x.index_put((torch.tensor([0]),), torch.tensor(math.nan)), ab, images, 3)
    with pytest.raises(PatchConfigError, match="NaN"):
        box_posterior_torch(x, ab, images.clone().fill_(math.inf), 3)
    with pytest.raises(PatchConfigError, match="alpha_bar"):
        box_posterior_torch(x, torch.tensor([0.5, 0.5]), images, 3)
    with pytest.raises(PatchConfigError, match=r"\[0, 1\]"):
        box_posterior_torch(x, 1.5, images, 3)
    with pytest.raises(PatchConfigError, match="log_weights"):
        box_posterior_torch(x, ab, images, 3, log_weights=logw[:2])
    with pytest.raises(PatchConfigError, match="chunk_images"):
        box_posterior_torch(x, ab, images, 3, chunk_images=0)
    with pytest.raises(PatchConfigError, match="dtype"):
        box_posterior_torch(x, ab, images, 3, dtype=torch.float16)


def test_gradients():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 1, 5, 5, generator=gen, dtype=torch.float64) * 2 - 1
    logw = torch.tensor([0.2, -0.4], dtype=torch.float64)
    x = torch.randn(1, 1, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: box_posterior_torch(t, 0.6, images, 3, log_weights=logw, chunk_images=1, dtype=torch.float64),
        (x,))
    x32 = x.detach().float().requires_grad_()                          # float32 (split squares): same gradient
    box_posterior_torch(x32, 0.6, images, 3, log_weights=logw).square().sum().backward()
    x.grad = None
    box_posterior_torch(x, 0.6, images, 3, log_weights=logw, dtype=torch.float64).square().sum().backward()
    assert (x32.grad.double() - x.grad).abs().max() < 1e-4
    assert x.grad.abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cuda_matches_cpu(dtype):
    x, ab, images, logw = problem(3, 9, 12, 7, 0.8, seed=11)
    cpu = box_posterior_torch(x.to(dtype), ab, images, 5, log_weights=logw, chunk_images=3, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True                      # switched off inside the call
    try:
        gpu = box_posterior_torch(x.to(dtype).cuda(), ab.cuda(), images.cuda(), 5, log_weights=logw.cuda(),
                                  chunk_images=3, dtype=dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() <= 1e-4
    xg = x.cuda().requires_grad_()
    box_posterior_torch(xg, ab.cuda(), images, 5).sum().backward()     # images on the CPU are moved to x's device
    assert xg.grad.device.type == "cuda" and torch.isfinite(xg.grad).all()


def test_forced_box_route_runs_the_torch_form_where_the_compiled_kernel_does_not_apply():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(4, 1, 7, 7, generator=gen, dtype=torch.float64) * 2 - 1
    data = sf.data.ImageSet(images.float(), name="box")
    x = torch.randn(2, 1, 7, 7, generator=gen, dtype=torch.float64)
    ab = torch.tensor([0.3, 0.8], dtype=torch.float64)
    forced = sf.models.make("els", data, patch_size=5, dtype="float64", cross_term="box")
    reference = sf.models.make("els", data, patch_size=5, dtype="float64", cross_term="gemm")
    torch.testing.assert_close(forced(x, ab), reference(x, ab), rtol=0, atol=1e-10)
    (entry,) = forced.engine_log()
    assert entry["cross_term"] == "box" and entry["fold"] == "reference"
