import pytest
import torch

import scorefield as sf
from scorefield.models.gaussian import FourierGaussianDenoiser, GaussianDenoiser


def random_gaussian(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64) * 0.3, A @ A.T / d + 0.05 * torch.eye(d)


def brute_force_posterior_mean(x, ab, mu, cov):
    """E[x0|x] from the joint Gaussian of (x0, x): μ + Cov(x0,x) Var(x)⁻¹ (x − aμ), by a linear solve."""
    out = []
    for b in range(x.shape[0]):
        a = ab[b].sqrt()
        var_x = a * a * cov + (1 - ab[b]) * torch.eye(len(mu), dtype=torch.float64)
        out.append(mu + a * cov @ torch.linalg.solve(var_x, x[b].reshape(-1) - a * mu))
    return torch.stack(out)


def test_full_gaussian_equals_brute_force():
    mu, cov = random_gaussian(12)
    model = GaussianDenoiser(mu, cov, (1, 3, 4))
    x = torch.randn(5, 1, 3, 4, dtype=torch.float64)
    ab = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    got = model(x, ab).reshape(5, -1)
    assert torch.allclose(got, brute_force_posterior_mean(x, ab, mu, cov), atol=1e-10)


def test_fourier_gaussian_equals_full_with_circulant_covariance():
    C, H, W = 2, 4, 5
    g = torch.Generator().manual_seed(3)
    spectrum = torch.rand(C, H, W, generator=g, dtype=torch.float64) + 0.1
    spectrum = 0.5 * (spectrum + torch.roll(torch.flip(spectrum, (1, 2)), (1, 1), (1, 2)))  # real field: λ(k)=λ(−k)
    mean = torch.tensor([0.2, -0.1], dtype=torch.float64)
    # circulant covariance per channel: Σ = F⁻¹ diag(λ) F, built by applying it to basis vectors
    eye = torch.eye(H * W, dtype=torch.float64).reshape(H * W, H, W)
    blocks = [torch.fft.ifft2(spectrum[c] * torch.fft.fft2(eye)).real.reshape(H * W, H * W) for c in range(C)]
    cov = torch.block_diag(*blocks)
    full = GaussianDenoiser(mean.repeat_interleave(H * W), cov, (C, H, W))
    four = FourierGaussianDenoiser(mean, spectrum, (C, H, W))
    x = torch.randn(3, C, H, W, dtype=torch.float64)
    ab = torch.tensor([0.1, 0.6, 0.97], dtype=torch.float64)
    assert torch.allclose(four(x, ab), full(x, ab), atol=1e-10)


def pf_ode_exact_map(noise, ab_start, mu, cov):
    """The probability-flow ODE is linear per eigenmode: (y − μ) ∝ √(λ + σ²) in VE coordinates, so
    x₀ = μ + U diag(√(λ / (λᾱ_T + 1 − ᾱ_T))) Uᵀ (x_T − √ᾱ_T μ)."""
    lam, U = torch.linalg.eigh(cov)
    gain = (lam.clamp_min(0) / (lam.clamp_min(0) * ab_start + 1 - ab_start)).sqrt()
    xt = noise.reshape(noise.shape[0], -1) - ab_start**0.5 * mu
    return mu + (xt @ U) * gain @ U.T


# (sampler, max error at 160 steps, max ratio err(160)/err(40): ≈ 1/4 for 1st order, ≈ 1/16 for 2nd order)
@pytest.mark.parametrize("sampler,tol,ratio", [("heun", 3e-4, 0.1), ("edm", 3e-3, 0.1), ("euler", 5e-3, 0.3),
                                               ("ddim", 5e-2, 0.3)])
def test_probability_flow_of_gaussian_data_reaches_the_analytic_map(sampler, tol, ratio):
    mu, cov = random_gaussian(9, seed=2)
    model = GaussianDenoiser(mu, cov, (1, 3, 3))
    noise = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = sf.schedules.CosineSchedule()
    errors = []
    for steps in (40, 160):
        grid = sf.sampling.default_grid(sched, steps, sampler)
        out = sf.sampling.sample(model, noise, sampler=sampler, ts=grid).reshape(4, -1)
        exact = pf_ode_exact_map(noise, float(sched.alpha_bar(grid[0])), mu, cov)
        errors.append(float((out - exact).abs().max()))
    assert errors[1] < ratio * errors[0], errors     # the discretization error shrinks at the method's order
    assert errors[1] < tol, errors


def test_make_gaussian_from_data_and_errors():
    data = sf.data.ImageSet(torch.rand(20, 1, 4, 4) * 2 - 1, name="r")
    for cov in ("full", "fourier"):
        m = sf.models.make("gaussian", data, covariance=cov)
        x = torch.randn(2, 1, 4, 4)
        out = m(x, torch.tensor([1.0, 1.0]))
        assert torch.allclose(out, x, atol=1e-4)    # at ᾱ = 1 the posterior mean is the input
    with pytest.raises(ValueError, match="covariance must be"):
        sf.models.make("gaussian", data, covariance="banana")
    with pytest.raises(ValueError, match="image shape"):
        sf.models.make("gaussian", data)(torch.randn(2, 1, 5, 5), torch.tensor([0.5, 0.5]))
