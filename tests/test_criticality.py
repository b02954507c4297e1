"""scorefield.analysis.criticality: GL critical time, mode softening, correlation-length estimators."""
from __future__ import annotations

import math

import pytest
import torch

import scorefield as sf
from scorefield.analysis import criticality as cr
from scorefield.schedules import ConstantVPSchedule


@pytest.fixture(scope="module")
def tanh5():
    data = sf.data.load("two-image", size=16)
    return sf.models.make("tanh", data, patch_size=5, padding="circular")


def _r_measured(model, t: float) -> float:
    return cr.uniform_mode_eigenvalue(model, math.exp(-t)).item()       # constant schedule: ᾱ = e^{−t}


# ---- 1. the uniform-mode eigenvalue changes sign at t_c = log(1 + |Ω|) ------------------------------------------

@pytest.mark.parametrize("patch_size", [3, 5])
def test_uniform_mode_eigenvalue_changes_sign_at_log_one_plus_omega(patch_size):
    data = sf.data.load("two-image", size=16)
    model = sf.models.make("tanh", data, patch_size=patch_size, padding="circular")
    omega = patch_size**2
    # measured r(t) equals eq. 15 with α² = e^{−t}, σ² = 1 − e^{−t} on a grid of t
    t = torch.linspace(0.5, 6.0, 12, dtype=torch.float64)
    measured = cr.uniform_mode_eigenvalue(model, torch.exp(-t))
    expected = cr.ginzburg_landau_two_state(t, omega).r
    torch.testing.assert_close(measured, expected, rtol=1e-10, atol=1e-10)
    # bisection on the measured sign change: r < 0 before t_c (unstable), r > 0 after
    lo, hi = 0.5, 6.0
    assert _r_measured(model, lo) < 0 < _r_measured(model, hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _r_measured(model, mid) < 0 else (lo, mid)
    assert abs(0.5 * (lo + hi) - math.log(1 + omega)) < 1e-9


# ---- 2. the tree-level critical time ----------------------------------------------------------------------------

def test_critical_time_two_state():
    assert cr.critical_time_two_state(25) == math.log(26)
    assert cr.critical_time_two_state(patch_area=25, beta=1.0) == pytest.approx(math.log(26), abs=0)
    assert cr.critical_time_two_state(9, beta=2.0) == pytest.approx(math.log(10) / 2, rel=1e-15)
    gl = cr.ginzburg_landau_two_state(cr.critical_time_two_state(25), 25)
    assert abs(gl.r.item()) < 1e-12                                    # r(t_c) = 0 (eq. 18)


def test_ginzburg_landau_kappa_is_the_k2_coefficient_of_the_exact_dispersion():
    t, p = 2.0, 5
    gl = cr.ginzburg_landau_two_state(t, p * p)
    a2, s2 = math.exp(-t), 1 - math.exp(-t)
    offsets = torch.arange(-(p // 2), p // 2 + 1, dtype=torch.float64)
    k = 1e-3
    omega_hat = p * torch.cos(k * offsets).sum().item()                # Σ_{u∈Ω} cos(k u_x)
    r_k = 1 / s2 - a2 * omega_hat / s2**2
    assert (r_k - gl.r.item()) / k**2 == pytest.approx(gl.kappa.item(), rel=1e-5)
    assert gl.u.item() == pytest.approx(a2**2 * 25**3 / (3 * s2**4), rel=1e-14)


# ---- 3. Fourier directional derivatives of a linear convolutional drift ------------------------------------------

class _CircularConv:
    """x̂₀ = K ⊛ x on the periodic lattice, K placed at offsets (a, b) -> lattice (a mod H, b mod W)."""

    def __init__(self, kernel_lattice: torch.Tensor) -> None:
        self.k_hat = torch.fft.fft2(kernel_lattice)                   # [H, W]

    def __call__(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.fft2(x) * self.k_hat).real


@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
def test_fourier_modes_of_linear_convolutional_drift_equal_kernel_fft(method):
    h, w, shells = 12, 16, 5
    g = torch.Generator().manual_seed(1)
    kernel = torch.zeros(h, w, dtype=torch.float64)
    for a in range(-1, 2):
        for b in range(-2, 3):
            kernel[a % h, b % w] = torch.rand((), generator=g, dtype=torch.float64) * 0.2
    model = _CircularConv(kernel)
    x = torch.randn(3, 2, h, w, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    soft = cr.mode_softening(model, x, ab, schedule="constant", shells=shells, method=method)
    k_hat = torch.fft.fft2(kernel).real                                # Re K̂(k)
    gamma, s2 = 0.5, 1 - ab[:, None]
    # b = −γx − 2γ(√ᾱ Kx − x)/σ²  ⇒  λ(k) = −γ − 2γ(√ᾱ Re K̂(k) − 1)/σ²
    lam_i = -gamma - 2 * gamma * (ab[:, None].sqrt() * k_hat[: shells + 1, 0][None] - 1) / s2
    lam_j = -gamma - 2 * gamma * (ab[:, None].sqrt() * k_hat[0, : shells + 1][None] - 1) / s2
    torch.testing.assert_close(soft.lambdas_i, lam_i, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(soft.lambdas_j, lam_j, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(soft.lambdas, (lam_i + lam_j) / 2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(soft.k_i, torch.arange(shells + 1, dtype=torch.float64) * 2 * math.pi / h)
    # the probability-flow drift v = −γ(x + s) gives λ(k) = −γ − γ(√ᾱ Re K̂ − 1)/σ²
    pf = cr.mode_softening(model, x, ab, shells=shells, method=method, drift="probability_flow")
    pf_i = -gamma - gamma * (ab[:, None].sqrt() * k_hat[: shells + 1, 0][None] - 1) / s2
    torch.testing.assert_close(pf.lambdas_i, pf_i, rtol=1e-9, atol=1e-9)


# ---- 4. finite difference equals JVP for the tanh machine ---------------------------------------------------------

def test_finite_difference_matches_jvp_for_tanh_machine(tanh5):
    g = torch.Generator().manual_seed(2)
    x = 0.5 * torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.02, 0.1, 0.5], dtype=torch.float64)
    jvp = cr.mode_softening(tanh5, x, ab, method="jvp")
    fd = cr.mode_softening(tanh5, x, ab, method="finite_difference")
    assert jvp.lambdas.shape == (3, 7) and jvp.xi_eq.shape == (3,)
    scale = jvp.lambdas.abs().amax(1, keepdim=True)
    # symmetric difference error O(ε² ∂³b), ε = max(5e-5, 1e-3 σ²) ≤ 1e-3
    assert ((fd.lambdas - jvp.lambdas).abs() / scale).max() < 1e-4
    assert not torch.equal(fd.lambdas, jvp.lambdas)                    # really two routes


def test_xi_eq_of_tanh_machine_at_zero_field_matches_exact_dispersion(tanh5):
    p, size = 5, 16
    offsets = torch.arange(-(p // 2), p // 2 + 1, dtype=torch.float64)
    k = torch.arange(7, dtype=torch.float64) * 2 * math.pi / size
    omega_hat = p * torch.cos(k[:, None] * offsets[None]).sum(1)        # [7]
    for t in (5.0, 8.0):                                                # after t_c, λ_0 > 0: the smooth branch
        a2, s2 = math.exp(-t), 1 - math.exp(-t)
        lam = -0.5 + (1 / s2 - a2 * omega_hat / s2**2)                  # −γ + 2γ r(k), γ = ½
        soft = cr.mode_softening(tanh5, torch.zeros(1, 1, size, size, dtype=torch.float64), a2)
        torch.testing.assert_close(soft.lambdas[0], lam, rtol=1e-10, atol=1e-10)
        y, k2 = lam[1:4] / lam[0] - 1, k[1:4] ** 2
        assert soft.xi_eq.item() == pytest.approx(math.sqrt((y * k2).sum() / (k2 * k2).sum()), rel=1e-9)
    # before the drift's uniform mode turns stable (λ_0 < 0), λ_n/λ_0 < 1: no real ξ_eq -> NaN
    soft = cr.mode_softening(tanh5, torch.zeros(1, 1, size, size, dtype=torch.float64), math.exp(-2.0))
    assert soft.lambdas[0, 0] < 0 and torch.isnan(soft.xi_eq).all()


def test_mode_softening_takes_a_schedule_object(tanh5):
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    one = cr.mode_softening(tanh5, x, 0.01, schedule="constant")
    two = cr.mode_softening(tanh5, x, 0.01, schedule=ConstantVPSchedule(beta=2.0))
    torch.testing.assert_close(two.lambdas, 2 * one.lambdas)            # γ = β/2 scales b linearly


# ---- 5. correlation-length estimators on periodic Gaussian fields -------------------------------------------------

L = 128


def _spectrum(ell: float) -> torch.Tensor:
    k = torch.fft.fftfreq(L, dtype=torch.float64) * 2 * math.pi
    return torch.exp(-(k[:, None] ** 2 + k[None, :] ** 2) * ell**2 / 2)  # correlation exp(−r²/(2ℓ²))


def _fields(ell: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 1, L, L, generator=g, dtype=torch.float64)
    return torch.fft.ifft2(torch.fft.fft2(w) * _spectrum(ell).sqrt()).real  # [n, 1, L, L]


def _expected(ell: float, method: str) -> float:
    """The estimator applied to the exact expected correlation: ρ for the mean-subtracted field (k = 0 removed),
    (2/π) arcsin ρ for its sign (Gaussian orthant identity)."""
    power = _spectrum(ell).clone()
    if method == "continuous":
        power[0, 0] = 0
    rho = torch.fft.ifft2(power).real
    rho = rho / rho[0, 0]
    c = (2 / math.pi) * torch.asin(rho.clamp(-1, 1)) if method == "binary" else rho
    return cr.moment_length(cr.radial_average(c[None]), 1 if method == "binary" else 2).item()


@pytest.mark.parametrize("method", ["binary", "continuous"])
def test_correlation_length_recovers_known_length_and_is_monotone(method):
    ells = (1.5, 3.0, 6.0)
    medians = []
    for i, ell in enumerate(ells):
        xi = cr.correlation_length(_fields(ell, 32, seed=10 + i), method=method)
        assert xi.shape == (32,) and xi.dtype == torch.float64
        medians.append(xi.median().item())
        # the median over 32 fields is within 15% of the estimator's value on the exact correlation
        assert medians[-1] == pytest.approx(_expected(ell, method), rel=0.15)
        if method == "continuous":                                      # half-Gaussian second moment: ξ ≈ ℓ
            assert medians[-1] == pytest.approx(ell, rel=0.2)
    assert medians[0] < medians[1] < medians[2]


def test_correlation_length_exact_values():
    # a field constant in sign: C(r) = 1 for all r ≤ R, so ξ = Σ r / (R+1) = R/2 (eq. 63)
    x = torch.ones(1, 1, 8, 8)
    assert cr.correlation_length(x, "binary").item() == pytest.approx(2.0)
    # a checkerboard: C(0) = 1, C(1) = −1 -> the positive portion is r = 0 only, ξ = 0
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).to(torch.float64)[None, None]
    assert cr.correlation_length(board, "binary").item() == 0.0
    # RGB goes through luminance, a constant image has no connected correlation -> NaN
    rgb = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    lum = (rgb * torch.tensor(cr.LUMINANCE, dtype=torch.float64)[None, :, None, None]).sum(1, keepdim=True)
    torch.testing.assert_close(cr.correlation_length(rgb, "continuous"), cr.correlation_length(lum, "continuous"))
    assert torch.isnan(cr.correlation_length(torch.ones(1, 1, 8, 8), "continuous")).all()


# ---- 6. bad input -> ValueError naming the argument --------------------------------------------------------------

def test_bad_inputs_name_the_argument(tanh5):
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        cr.correlation_length(x, method="radial")
    with pytest.raises(ValueError, match="^x"):
        cr.correlation_length(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="^x"):
        cr.correlation_length(torch.full((1, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="^x"):
        cr.correlation_length(torch.zeros(1, 2, 8, 8), method="continuous")
    with pytest.raises(ValueError, match="method"):
        cr.mode_softening(tanh5, x, 0.5, method="exact")
    with pytest.raises(ValueError, match="drift"):
        cr.mode_softening(tanh5, x, 0.5, drift="ode")
    with pytest.raises(ValueError, match="alpha_bar"):
        cr.mode_softening(tanh5, x, 1.5)
    with pytest.raises(ValueError, match="alpha_bar"):
        cr.mode_softening(tanh5, x, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="shells"):
        cr.mode_softening(tanh5, x, 0.5, shells=2)
    with pytest.raises(ValueError, match="schedule"):
        cr.mode_softening(tanh5, x, 0.5, schedule="sigmoid")
    with pytest.raises(ValueError, match="model"):
        cr.mode_softening("tanh", x, 0.5)
    with pytest.raises(ValueError, match="patch_area"):
        cr.critical_time_two_state(0)
    with pytest.raises(ValueError, match="beta"):
        cr.critical_time_two_state(25, beta=0.0)
    with pytest.raises(ValueError, match="patch_area"):
        cr.ginzburg_landau_two_state(1.0, patch_area=24)
    with pytest.raises(ValueError, match="t must"):
        cr.ginzburg_landau_two_state(0.0, patch_area=25)
    with pytest.raises(ValueError, match="alpha_bar"):
        cr.uniform_mode_eigenvalue(tanh5, 0.0)
