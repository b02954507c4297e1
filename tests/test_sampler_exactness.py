"""Every sampler on every schedule against the exact answer for Gaussian data: started from the prior, the
samples of x₀ ~ N(μ, Σ) through the exact Gaussian denoiser must have mean μ and covariance Σ (stochastic
samplers: DDIM with η ∈ {0.5, 1} and the reverse SDE; deterministic ones too).

Tolerance: Monte Carlo error of n = 6000 samples, |Σ̂_ij − Σ_ij| has standard deviation
√((Σ_ii Σ_jj + Σ_ij²)/n) ≤ √(2/n)·max Σ_ii; we allow 5 of those plus 0.02·max Σ_ii of discretization error
(100 steps)."""
from __future__ import annotations

import math

import pytest
import torch

import scorefield as sf
from scorefield.models.gaussian import GaussianDenoiser

N, STEPS = 1500, 100


def _gaussian(d: int = 4, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    return 0.2 * torch.randn(d, generator=g, dtype=torch.float64), a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "edm"])
@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("ddim", {"eta": 0.5}), ("ddim", {"eta": 1.0}),
                                             ("sde", {}), ("euler", {}), ("heun", {}), ("edm", {})])
def test_samples_of_gaussian_data_have_its_mean_and_covariance(schedule, sampler, options):
    mu, cov = _gaussian()
    model = GaussianDenoiser(mu, cov, (1, 2, 2))
    sched = sf.schedules.get_schedule(schedule)
    grid = sf.sampling.default_grid(sched, STEPS, sampler)
    ab0 = float(sched.alpha_bar(grid[0]))
    # the exact marginal at the first grid time: √ᾱ·x₀ + √(1−ᾱ)·ε
    g = torch.Generator().manual_seed(7)
    x0 = mu + torch.randn(N, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    start = math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * torch.randn(N, 4, generator=g, dtype=torch.float64)
    out = sf.sampling.sample(model, start.reshape(N, 1, 2, 2), sampler=sampler, ts=grid, schedule=sched,
                             seeds=range(N), **options).reshape(N, 4)
    scale = float(cov.diagonal().max())
    tol = 5 * math.sqrt(2 / N) * scale + 0.02 * scale
    assert (out.mean(0) - mu).abs().max() < 5 * math.sqrt(scale / N) + 0.02 * math.sqrt(scale)
    assert (torch.cov(out.T) - cov).abs().max() < tol
