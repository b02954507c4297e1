import pytest
import torch

import scorefield as sf
from scorefield.models.gaussian import GaussianDenoiser


def small_gaussian_model():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    return GaussianDenoiser(torch.zeros(16, dtype=torch.float64), A @ A.T / 16 + 0.1 * torch.eye(16), (1, 4, 4))


@pytest.mark.parametrize("sampler", sorted(sf.sampling.SAMPLERS))
def test_every_sampler_runs_reports_each_step_and_is_batch_size_independent(sampler):
    model = small_gaussian_model()
    noise = sf.sampling.initial_noise(4, (1, 4, 4), seeds=[10, 11, 12, 13]).to(torch.float64)
    seen = []
    full = sf.sampling.sample(model, noise, steps=6, sampler=sampler, seeds=[10, 11, 12, 13], eta=1.0,
                              callback=lambda info: seen.append(info["step"])) if sampler == "ddim" else \
        sf.sampling.sample(model, noise, steps=6, sampler=sampler, seeds=[10, 11, 12, 13],
                           callback=lambda info: seen.append(info["step"]))
    assert full.shape == noise.shape and torch.isfinite(full).all()
    assert seen[0] == 0 and seen[-1] >= 6                    # every intermediate state is reported
    opts = {"eta": 1.0} if sampler == "ddim" else {}
    halves = [sf.sampling.sample(model, noise[i:i + 2], steps=6, sampler=sampler, seeds=[10 + i, 11 + i], **opts)
              for i in (0, 2)]
    assert torch.allclose(torch.cat(halves), full, atol=1e-12, rtol=0)


def test_initial_noise_depends_only_on_the_seed():
    a = sf.sampling.initial_noise(3, (1, 2, 2), seeds=[7, 8, 9])
    b = sf.sampling.initial_noise(1, (1, 2, 2), seeds=[8])
    assert torch.equal(a[1], b[0])


def test_stochastic_samplers_differ_from_deterministic_and_need_seeds():
    model = small_gaussian_model()
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    det = sf.sampling.sample(model, noise, steps=8, sampler="ddim")
    sto = sf.sampling.sample(model, noise, steps=8, sampler="ddim", eta=1.0, seeds=[1, 2])
    assert not torch.allclose(det, sto)
    with pytest.raises(ValueError, match="unknown sampler"):
        sf.sampling.sample(model, noise, sampler="nope")
    with pytest.raises(ValueError, match="seeds"):
        sf.sampling.sample(model, noise, seeds=[1])
    with pytest.raises(ValueError, match="NaN"):
        sf.sampling.sample(model, noise * float("nan"))


def test_guidance_scale_one_is_conditional_and_window_restricts():
    class Toy(sf.models.Denoiser):
        conditional = True                    # labels=None is its unconditional prediction
        unconditional_without_labels = True

        def denoise(self, x, ab, labels):
            return torch.zeros_like(x) if labels is None else torch.ones_like(x) * labels.reshape(-1, 1, 1, 1)

    toy = Toy((1, 2, 2))
    x = torch.randn(2, 1, 2, 2)
    w = sf.sampling.guided(toy, sf.sampling.Guidance(scale=3.0, alpha_bar_min=0.5, alpha_bar_max=1.0))
    out = w(x, torch.tensor([0.9, 0.1]), torch.tensor([1, 1]))
    assert torch.allclose(out[0], torch.full_like(out[0], 3.0))   # inside the window: 0 + 3·(1 − 0)
    assert torch.allclose(out[1], torch.full_like(out[1], 1.0))   # outside: plain conditional


def test_a_grid_finer_than_float32_resolves_runs_with_a_float32_model():
    model = small_gaussian_model()
    ts = torch.tensor([1.0, 0.5, 1e-8, 0.0], dtype=torch.float64)     # ᾱ(1e-8) rounds to 1 in float32
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    out32 = sf.sampling.sample(model, noise, ts=ts)
    out64 = sf.sampling.sample(model, noise.to(torch.float64), ts=ts)
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
    assert torch.allclose(out32.double(), out64, rtol=0, atol=1e-6 * out64.abs().max().item())


# ---- float64 sampler state, denoiser in the noise's dtype ---------------------------------------------------

V = 0.3           # data x₀ ~ N(0, V·I); not a power of 2, so V·x/V is not exactly x in float32


def gaussian_x0(x, alpha_bar, labels=None):
    """Exact posterior mean for x₀ ~ N(0, V·I): x̂₀ = √ᾱ·V·x/(ᾱ·V + 1 − ᾱ), computed in x's dtype; x: [B, C, H, W]."""
    ab = alpha_bar.reshape(-1, 1, 1, 1)
    return ab.sqrt() * V * x / (ab * V + 1 - ab)


def fine_log_grid(sampler, steps):
    """A log grid from the sampler's default start down to t = 1e-10 (1 − ᾱ ≈ 4e-12: ᾱ is 1.0 in float32), then 0."""
    schedule = sf.schedules.get_schedule("cosine")
    t_start = float(sf.sampling.default_grid(schedule, steps, "ddim" if sampler == "ddim" else "euler")[0])
    return torch.cat([sf.schedules.log_grid(steps, t_start, 1e-10), torch.zeros(1, dtype=torch.float64)])


def test_a_grid_finer_than_float64_resolves_is_still_refused():
    # constant schedule: ᾱ = exp(−t) and exp(−1e-20) == 1.0 exactly in float64, so 1 − ᾱ = 0 before the last step
    ts = torch.tensor([50.0, 1.0, 1e-20, 0.0], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(sf.sampling.SamplingError, match="1 − ᾱ rounds to 0 even in torch.float64"):
            sf.sampling.sample(gaussian_x0, torch.randn(1, 1, 4, 4, dtype=dtype), ts=ts, schedule="constant")
    ok = torch.tensor([50.0, 1.0, 1e-12, 0.0], dtype=torch.float64)   # 1 − ᾱ ≈ 1e-12 resolves in float64
    assert torch.isfinite(sf.sampling.sample(gaussian_x0, torch.randn(1, 1, 4, 4), ts=ok, schedule="constant")).all()


@pytest.mark.parametrize("sampler", sorted(sf.sampling.SAMPLERS))
def test_a_float32_model_walks_a_log_grid_down_to_1e_10_like_a_float64_one(sampler):
    seen = []

    def model(x, ab, labels=None):
        seen.append(ab)
        return gaussian_x0(x, ab, labels)

    ts = fine_log_grid(sampler, 200)
    noise = sf.sampling.initial_noise(4, (1, 4, 4), seeds=[0, 1, 2, 3])                 # float32
    out32 = sf.sampling.sample(model, noise, ts=ts, sampler=sampler, seeds=[0, 1, 2, 3])
    assert any((ab == 1.0).all() for ab in seen)          # the float32 model was handed ᾱ = 1.0 ...
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()   # ... and nothing divided by 1 − ᾱ = 0
    out64 = sf.sampling.sample(gaussian_x0, noise.double(), ts=ts, sampler=sampler, seeds=[0, 1, 2, 3])
    # Both states are float64; they differ only by the float32 rounding of x, ᾱ and x̂₀ in the model calls. The
    # largest part is ᾱ: float32 moves it by up to 2⁻²⁴ ≈ 6e-8, x̂₀ moves by d log x̂₀/dᾱ ≈ ½ + (1 − V)/V ≈ 2.8 times
    # that near ᾱ = 1, over the tens of steps with 1 − ᾱ ≲ 1e-6 (measured 1.1e-6 to 2.5e-6 for every sampler and
    # 50 to 800 steps). A float32 state divides float32 rounding by 1 − ᾱ ≈ 4e-12 instead: NaN for euler, heun and
    # sde, 1.5e-5 for ddim.
    assert torch.allclose(out32.double(), out64, rtol=0, atol=5e-6 * out64.abs().max().item())


def test_ddim_on_gaussian_data_converges_to_the_probability_flow_map():
    # For N(0, V·I) data the probability flow keeps x_t/√(ᾱV + 1 − ᾱ) fixed, so from pure noise (ᾱ(1) ≈ 0) to
    # ᾱ = 1 it maps x_T to x_T·√V. DDIM (η = 0) is a first-order solver of it: the error falls like 1/steps
    # (≈ 9/steps here), so 4× the steps must cut it about 4×, and 400 steps be within 3% (measured 2.3%).
    noise = sf.sampling.initial_noise(4, (1, 4, 4), seeds=[0, 1, 2, 3])
    exact = noise.double() * V**0.5
    errors = []
    for steps in (100, 400):
        out = sf.sampling.sample(gaussian_x0, noise, ts=fine_log_grid("ddim", steps), sampler="ddim")
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        errors.append(((out.double() - exact).abs().max() / exact.abs().max()).item())
    assert errors[1] < 0.03 and 3.0 < errors[0] / errors[1] < 5.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", sorted(sf.sampling.SAMPLERS))
def test_the_model_runs_in_the_noise_dtype_through_guidance_and_clipping(sampler, dtype):
    calls = []

    def model(x, ab, labels=None):                        # a conditional model for classifier-free guidance
        calls.append((x.dtype, ab.dtype, ab.shape, x))
        shift = 0.0 if labels is None else 0.1 * labels.to(x.dtype).reshape(-1, 1, 1, 1)
        return gaussian_x0(x, ab) + shift

    reported = []
    noise = sf.sampling.initial_noise(2, (1, 4, 4), seeds=[5, 6]).to(dtype)
    out = sf.sampling.sample(model, noise, steps=6, sampler=sampler, seeds=[5, 6], labels=torch.tensor([0, 1]),
                             guidance=2.0, clip_x0=True, callback=reported.append)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert calls and all(c[:3] == (dtype, dtype, torch.Size([2])) for c in calls)
    steps = [r for r in reported if r["x0_hat"] is not None]
    assert steps and all(r["x"].dtype == dtype and r["x0_hat"].dtype == dtype for r in steps)
    assert all(r["x0_hat"].abs().max() <= 1.0 for r in steps)                            # clipping applied
    assert all(any(torch.equal(r["x"], c[3]) for c in calls) for r in steps)            # x is what the model saw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sde_noise_is_the_generators_first_default_dtype_draw_whatever_the_noise_dtype(dtype):
    # from x = 0 with x̂₀ = 0 the drift vanishes, so one step with noise is exactly √(2γ|Δt|)·η₀ (eq. 60), η₀ the
    # first torch.randn of each sample's generator, drawn as before the float64 state (default dtype, then cast)
    ts = torch.tensor([0.5, 0.4], dtype=torch.float64)
    out = sf.sampling.sample(lambda x, ab, labels=None: torch.zeros_like(x), torch.zeros(2, 1, 3, 3, dtype=dtype),
                             ts=ts, sampler="sde", seeds=[7, 8], denoise_last=False)
    eta = torch.stack([torch.randn((1, 3, 3), generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    gamma = float(sf.schedules.get_schedule("cosine").gamma(ts[0]))
    expected = ((2 * gamma * 0.1) ** 0.5 * eta.double()).to(dtype)
    assert out.dtype == dtype and torch.allclose(out, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name,opts", [("is", {}), ("els", {"patch_size": 3, "padding": "circular"})])
def test_machine_samples_do_not_depend_on_batch_size(name, opts):
    data = sf.data.ImageSet(torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(4)) * 2 - 1)
    model = sf.models.make(name, data, **opts)
    noise = sf.sampling.initial_noise(4, (1, 6, 6), seeds=[0, 1, 2, 3])
    together = sf.sampling.sample(model, noise, steps=8, sampler="ddim", eta=0.5, seeds=[0, 1, 2, 3])
    apart = torch.cat([sf.sampling.sample(model, noise[i:i + 1], steps=8, sampler="ddim", eta=0.5, seeds=[i])
                       for i in range(4)])
    assert torch.allclose(together, apart, atol=1e-5, rtol=0)
