"""scorefield.data.phi4: the φ⁴ sampler against exact answers (free-theory two-point function and Gaussian
magnetization, the equipartition identity ⟨φ·∂S/∂φ⟩ = L² at any coupling), the leapfrog's reversibility and
O(ε²) energy error, Sokal's τ_int on an AR(1) series, the dataset and CLI, bad inputs and seeds."""
from __future__ import annotations

import math

import pytest
import torch

import scorefield as sf
from scorefield.cli import main
from scorefield.data import DataError, phi4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def free_run():
    """Free theory, 4×4, m² = 0.5: 8,000 HMC samples from 200 chains (40 per chain, for τ error bars)."""
    return phi4.sample_phi4(size=4, mass2=0.5, coupling=0.0, n=8000, chains=200, seed=3)


# ---- exact free theory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 5, 6])
def test_free_two_point_inverts_the_lattice_operator(size):
    mass2 = 0.7
    g = phi4.free_two_point(size, mass2)
    delta = torch.zeros(size, size, dtype=torch.float64)
    delta[0, 0] = 1.0
    torch.testing.assert_close(-phi4.laplacian(g) + mass2 * g, delta, atol=1e-12, rtol=0)
    assert torch.allclose(g, g.T) and torch.allclose(g, g.flip(0).roll(1, 0))  # lattice symmetries


def test_free_two_point_matches_exact_within_statistical_error(free_run):
    run = free_run
    assert run.diagnostics["tau_int_pilot"]["magnetization"]["converged"]
    mean, error, tau = phi4.mean_and_error(phi4.correlators(run.fields), run.chains)  # [4, 4] each
    exact = phi4.free_two_point(4, 0.5)
    z = (mean - exact) / error
    assert z.abs().max() < 4.0, z
    assert (error / exact.abs()).max() < 0.05  # the test has power: a few-percent error bar on every G(x)
    assert (tau < 2).all()  # thinned by ⌈2 τ_int⌉: the samples are close to independent
    # the connected estimator agrees (⟨M⟩ = 0 up to noise)
    torch.testing.assert_close(phi4.two_point(run.fields), mean - phi4.magnetization(run.fields).mean() ** 2)
    # equipartition: ⟨S⟩ = L²/2 for a Gaussian action
    s_mean, s_error, _ = phi4.mean_and_error(phi4.action(run.fields, 0.5, 0.0), run.chains)
    assert abs(s_mean.item() - 8.0) < 4 * s_error.item()


@pytest.mark.parametrize("method", ["hmc", "metropolis"])
def test_magnetization_is_gaussian_with_the_exact_variance(method, free_run):
    run = free_run if method == "hmc" else phi4.sample_phi4(size=4, mass2=0.5, coupling=0.0, n=8000, chains=200,
                                                             seed=4, method=method)
    sigma = math.sqrt(1 / (0.5 * 16))  # Var M = G̃(k = 0)/L² = 1/(m² L²)
    z = phi4.magnetization(run.fields) / sigma
    moments = torch.stack([z, z**2, z**3, z**4], dim=1)  # Gaussian: 0, 1, 0, 3
    mean, error, _ = phi4.mean_and_error(moments, run.chains)
    expected = torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    assert ((mean - expected).abs() < 4 * error).all(), (mean, error)
    assert error[1] < 0.03


# ---- the interacting theory -----------------------------------------------------------------------------------


def test_force_is_the_gradient_of_the_action():
    phi = torch.randn(3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    s = phi4.action(phi, -0.8, 2.5).sum()
    (grad,) = torch.autograd.grad(s, phi)
    torch.testing.assert_close(phi4.force(phi.detach(), -0.8, 2.5), grad)


@pytest.mark.parametrize("method", ["hmc", "metropolis"])
def test_equipartition_identity_holds_at_finite_coupling(method):
    """⟨Σ_x φ_x ∂S/∂φ_x⟩ = L² for any action (integrate by parts), here in the interacting symmetric phase;
    an odd lattice exercises the three-colour Metropolis sweep."""
    run = phi4.sample_phi4(size=5, mass2=0.2, coupling=3.0, n=3000, chains=100, seed=5, method=method)
    virial = (run.fields[:, 0] * phi4.force(run.fields[:, 0], 0.2, 3.0)).sum(dim=(-2, -1))
    mean, error, _ = phi4.mean_and_error(virial, run.chains)
    assert abs(mean.item() - 25.0) < 4 * error.item() and error.item() < 0.5
    lo, hi = (0.7, 0.9) if method == "hmc" else (0.4, 0.6)
    assert lo < run.diagnostics["acceptance"] < hi


def test_hmc_and_metropolis_agree_at_finite_coupling():
    runs = [phi4.sample_phi4(size=4, mass2=0.2, coupling=3.0, n=3000, chains=100, seed=6, method=m)
            for m in ("hmc", "metropolis")]
    stats = [phi4.mean_and_error(torch.stack([phi4.action(r.fields, 0.2, 3.0),
                                              phi4.magnetization(r.fields) ** 2], dim=1), r.chains) for r in runs]
    (m1, e1, _), (m2, e2, _) = stats
    assert ((m1 - m2).abs() < 4 * torch.sqrt(e1**2 + e2**2)).all(), (m1, m2)


def test_broken_phase_samples_both_vacua_with_z2_flips():
    run = phi4.sample_phi4(size=6, mass2=-1.0, coupling=3.0, n=400, seed=7, z2_flip=True)
    m = phi4.magnetization(run.fields)
    assert m.abs().mean() > 1.0  # ordered: |M| near the classical vev √(−6m²/λ) = √2
    assert 0.35 < (m > 0).double().mean() < 0.65
    assert run.diagnostics["tau_int_pilot"]["magnetization"]["converged"]


def test_unconverged_window_warns_and_does_not_set_thinning():
    with pytest.warns(RuntimeWarning, match="did not converge for magnetization"):
        run = phi4.sample_phi4(size=6, mass2=-1.0, coupling=3.0, n=64, seed=8, max_pilot=200)
    pilot = run.diagnostics["tau_int_pilot"]
    assert not pilot["magnetization"]["converged"] and pilot["action"]["converged"]
    assert run.diagnostics["thin"] < pilot["magnetization"]["tau"]


def test_from_hopping_is_the_same_action():
    kappa, lam = 0.28, 0.022
    mass2, coupling, scale = phi4.from_hopping(kappa, lam)
    varphi = torch.randn(4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hop = sum(varphi * varphi.roll(1, d) for d in (-1, -2))
    s_hop = (-2 * kappa * hop + (1 - 2 * lam) * varphi**2 + lam * varphi**4).sum(dim=(-2, -1))
    torch.testing.assert_close(phi4.action(scale * varphi, mass2, coupling), s_hop)


# ---- leapfrog -------------------------------------------------------------------------------------------------


def _state(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 6, 6, dtype=torch.float64, generator=g),
            torch.randn(8, 6, 6, dtype=torch.float64, generator=g))


def test_leapfrog_is_reversible():
    phi, p = _state()
    forward_phi, forward_p = phi4.leapfrog(phi, p, 0.05, 40, -0.5, 3.0)
    back_phi, back_p = phi4.leapfrog(forward_phi, -forward_p, 0.05, 40, -0.5, 3.0)
    torch.testing.assert_close(back_phi, phi, atol=1e-10, rtol=0)
    torch.testing.assert_close(-back_p, p, atol=1e-10, rtol=0)


def test_leapfrog_energy_error_is_second_order():
    phi, p = _state(1)
    phi = 0.5 * phi  # moderate fields, so ε = 0.02 is deep in the asymptotic regime
    h0 = phi4.hamiltonian(phi, p, -0.5, 3.0)
    errors = []
    for eps in (0.02, 0.01, 0.005):
        new_phi, new_p = phi4.leapfrog(phi, p, eps, round(1.0 / eps), -0.5, 3.0)  # trajectory length 1
        errors.append((phi4.hamiltonian(new_phi, new_p, -0.5, 3.0) - h0).abs().mean().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.6 < r < 4.4 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-3


# ---- autocorrelation ------------------------------------------------------------------------------------------


def test_sokal_tau_of_an_ar1_series():
    """x_t = a x_{t−1} + noise has ρ(t) = aᵗ, so τ_int = ½ + a/(1 − a) = (1 + a)/(2(1 − a))."""
    a, chains, steps = 0.8, 64, 4000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(chains, steps, dtype=torch.float64, generator=g)
    x = torch.empty_like(noise)
    x[:, 0] = noise[:, 0] / math.sqrt(1 - a * a)
    for t in range(1, steps):
        x[:, t] = a * x[:, t - 1] + noise[:, t]
    result = phi4.autocorrelation_time(x)
    exact = (1 + a) / (2 * (1 - a))
    assert bool(result.converged) and abs(result.tau.item() - exact) < 4 * result.error.item()
    assert phi4.autocorrelation_time(torch.ones(3, 10)).tau.item() == 0.5  # constant series


def test_metropolis_colouring_is_proper():
    for size in range(2, 8):
        colour, k = phi4._colours(size)
        assert k == (2 if size % 2 == 0 else 3)
        for d in (0, 1):
            assert (colour != colour.roll(1, d)).all(), size


# ---- the dataset, CLI, inputs, seeds --------------------------------------------------------------------------


def test_load_gives_an_imageset_with_physical_fields_and_diagnostics():
    data = sf.data.load("phi4", size=6, mass2=0.5, coupling=3.0, n=300, seed=0)
    assert isinstance(data, sf.data.ImageSet) and data.images.shape == (300, 1, 6, 6)
    assert data.images.abs().max().item() == pytest.approx(1.0)  # default scale: max |φ| of the set
    diag = data.provenance["sampler"]
    assert diag["method"] == "hmc" and 0.6 < diag["acceptance"] < 0.95
    assert set(diag["tau_int_pilot"]) == {"magnetization", "abs_magnetization", "action"}
    # φ back from the images: the same fields as the lower-level sampler with the dataset's stream
    direct = phi4.sample_phi4(size=6, mass2=0.5, coupling=3.0, n=300, seed=torch.Generator().manual_seed(0))
    torch.testing.assert_close(phi4.fields(data), direct.fields, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(phi4.fields(data.images, scale=phi4.field_scale(data)), phi4.fields(data))
    # a fixed scale shared by splits; the test split is another stream
    test = sf.data.load("phi4", split="test", size=6, mass2=0.5, coupling=3.0, n=300, seed=0, scale=20.0)
    assert test.provenance["field_scale"] == 20.0 and not torch.equal(phi4.fields(test), phi4.fields(data))


def test_same_seed_same_samples():
    fast = {"size": 4, "mass2": 1.0, "coupling": 1.0, "n": 50, "tune": 30, "thermalization": 10, "thin": 2}
    for method in ("hmc", "metropolis"):
        a = phi4.sample_phi4(**fast, seed=11, method=method).fields
        b = phi4.sample_phi4(**fast, seed=11, method=method).fields
        c = phi4.sample_phi4(**fast, seed=12, method=method).fields
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("options, message", [
    ({"size": 1}, "size must be an integer ≥ 2"),
    ({"size": 4.0}, "size must be an integer ≥ 2"),
    ({"n": 0}, "n must be an integer ≥ 1"),
    ({"n": -5}, "n must be an integer ≥ 1"),
    ({"mass2": float("nan")}, "mass2 must be a finite number"),
    ({"coupling": float("nan")}, "coupling must be a finite number"),
    ({"coupling": float("inf")}, "coupling must be a finite number"),
    ({"mass2": 0.0, "coupling": 0.0}, "unbounded below"),
    ({"mass2": -1.0, "coupling": 0.0}, "unbounded below"),
    ({"coupling": -1.0}, "unbounded below"),
    ({"method": "gibbs"}, "unknown method"),
    ({"scale": 1e-3}, "smaller than the largest"),
])
def test_bad_inputs_give_clear_errors(options, message):
    kwargs = {"size": 4, "mass2": 1.0, "coupling": 0.0, "n": 20, **options}
    with pytest.raises(DataError, match=message):
        sf.data.load("phi4", **kwargs)


def test_free_two_point_rejects_massless_theory():
    with pytest.raises(DataError, match="unbounded below"):
        phi4.free_two_point(6, 0.0)


def test_cli_lists_and_describes_phi4(capsys):
    assert main(["data", "list"]) == 0
    assert "phi4" in capsys.readouterr().out
    assert main(["data", "info", "phi4", "--size", "4", "--n", "40", "-o", "mass2=1.0", "-o", "coupling=0.5",
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert '"field_scale"' in out and '"acceptance"' in out and '"height": 4' in out
    assert main(["data", "info", "phi4", "--size", "1"]) != 0
