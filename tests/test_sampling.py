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
        conditional = False

        def denoise(self, x, ab, labels):
            return torch.zeros_like(x) if labels is None else torch.ones_like(x) * labels.reshape(-1, 1, 1, 1)

    toy = Toy((1, 2, 2))
    x = torch.randn(2, 1, 2, 2)
    w = sf.sampling.guided(toy, sf.sampling.Guidance(scale=3.0, alpha_bar_min=0.5, alpha_bar_max=1.0))
    out = w(x, torch.tensor([0.9, 0.1]), torch.tensor([1, 1]))
    assert torch.allclose(out[0], torch.full_like(out[0], 3.0))   # inside the window: 0 + 3·(1 − 0)
    assert torch.allclose(out[1], torch.full_like(out[1], 1.0))   # outside: plain conditional


def test_a_grid_finer_than_float32_resolves_is_refused_with_advice():
    model = small_gaussian_model()
    ts = torch.tensor([1.0, 0.5, 1e-8, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        sf.sampling.sample(model, torch.randn(1, 1, 4, 4), ts=ts)
    out = sf.sampling.sample(model, torch.randn(1, 1, 4, 4, dtype=torch.float64), ts=ts)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,opts", [("is", {}), ("els", {"patch_size": 3, "padding": "circular"})])
def test_machine_samples_do_not_depend_on_batch_size(name, opts):
    data = sf.data.ImageSet(torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(4)) * 2 - 1)
    model = sf.models.make(name, data, **opts)
    noise = sf.sampling.initial_noise(4, (1, 6, 6), seeds=[0, 1, 2, 3])
    together = sf.sampling.sample(model, noise, steps=8, sampler="ddim", eta=0.5, seeds=[0, 1, 2, 3])
    apart = torch.cat([sf.sampling.sample(model, noise[i:i + 1], steps=8, sampler="ddim", eta=0.5, seeds=[i])
                       for i in range(4)])
    assert torch.allclose(together, apart, atol=1e-5, rtol=0)
