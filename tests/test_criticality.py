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


# ---- 7. dξ/d log t, peak times, the instability window ------------------------------------------------------------

def test_log_time_derivative_is_exact_for_polynomials_in_log_t_away_from_the_ends():
    t = torch.exp(torch.linspace(math.log(50.0), math.log(1e-3), 801, dtype=torch.float64))   # descending, eq. 59
    u = t.log()
    width = 0.1
    inner = (u - u.min() > 6 * width) & (u.max() - u > 6 * width)
    # linear and quadratic in u: Gaussian smoothing adds a constant (w² for u²), the derivative is untouched
    curves = torch.stack([3 * u + 1, u**2 - 2 * u])
    d = cr.log_time_derivative(curves, t, width)
    torch.testing.assert_close(d[0, inner], torch.full_like(u[inner], 3.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(d[1, inner], 2 * u[inner] - 2, rtol=0, atol=1e-4)
    # width 0 is plain second-order differences; NaN entries are skipped by the smoother
    torch.testing.assert_close(cr.smooth_log_time(curves, t, 0.0), curves)
    holes = curves.clone()
    holes[:, ::7] = float("nan")
    torch.testing.assert_close(cr.log_time_derivative(holes, t, width)[0, inner], d[0, inner], rtol=0, atol=1e-6)


def test_growth_peak_of_a_tanh_front_is_at_its_centre():
    t = torch.exp(torch.linspace(math.log(50.0), math.log(1e-3), 2001, dtype=torch.float64))
    t_star = 1.7
    xi = 5 * torch.tanh((math.log(t_star) - t.log()) / 0.4) + 5            # grows as t decreases
    peak = cr.median_peak(-cr.log_time_derivative(xi[None].expand(3, -1), t, 0.05), t, "max")
    spacing = math.log(50 / 1e-3) / 2000
    assert abs(math.log(peak.t / t_star)) <= spacing
    assert peak.value == pytest.approx(5 / 0.4, rel=3e-2)                  # max of d/du 5 tanh(u/0.4), smoothed
    onset = cr.rise_time(xi[None], t, 0.5)                                 # half the rise: the centre
    assert abs(math.log(onset.t / t_star)) <= spacing


def test_median_peak_ignores_times_where_few_trajectories_have_a_value():
    t = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    nan = float("nan")
    xi_eq = torch.tensor([[1.0, 2.0, nan, 1.5], [1.2, 2.5, nan, 1.0], [0.8, 2.2, 99.0, 1.1]], dtype=torch.float64)
    assert cr.critical_time_from_xi_eq(xi_eq, t).t == 3.0                 # 99 stands alone among NaN
    assert cr.median_peak(xi_eq, t, "max").t == 2.0                        # min_fraction = 0 keeps it
    assert cr.critical_time_from_xi_eq(xi_eq, t, t_range=(0.5, 2.5)).t == 1.0
    with pytest.raises(ValueError, match="values"):
        cr.median_peak(torch.full((2, 4), nan), t)
    # λ_0 medians over 3 trajectories: 0.4, −0.05, −0.2, 0.1, 0.3 -> unstable from t = 4 until t = 2
    lam0 = torch.tensor([[0.4, 0.1, -0.2, -0.1, 0.3], [0.5, -0.05, -0.3, 0.2, 0.4], [0.3, -0.1, 0.1, 0.1, 0.2]],
                        dtype=torch.float64)
    times = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    win = cr.instability_window(lam0, times)
    assert (win.t_enter, win.t_exit, win.index_enter, win.index_exit) == (4.0, 2.0, 1, 3)
    assert math.isnan(cr.instability_window(lam0.abs(), times).t_enter)   # never unstable


class _Dispersion:
    """A linear circular convolution x̂₀ = K_t ⊛ x whose reverse-SDE drift (constant schedule, γ = ½) has
    λ(k) = λ₀(1 + ξ(t)²|k|²) exactly: √ᾱ K̂(k) = 1 − σ²(λ(k) + γ)/(2γ) (inverting the drift of test 3)."""

    def __init__(self, size: int, xi_of_t, lam0: float = 0.3) -> None:
        k = torch.fft.fftfreq(size, dtype=torch.float64) * 2 * math.pi
        self.k2 = k[:, None] ** 2 + k[None, :] ** 2                        # [H, W]
        self.xi_of_t, self.lam0 = xi_of_t, lam0

    def __call__(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        t = -ab.log()
        lam = self.lam0 * (1 + self.xi_of_t(t)[:, None, None] ** 2 * self.k2)  # [B, H, W]
        gamma, s2 = 0.5, 1 - ab[:, None, None]
        k_hat = (1 - s2 * (lam + gamma) / (2 * gamma)) / ab.sqrt()[:, None, None]
        return torch.fft.ifft2(torch.fft.fft2(x) * k_hat[:, None]).real


def test_xi_eq_argmax_picks_the_time_of_a_known_xi_eq_peak():
    t_star, size = 2.5, 32

    def xi_of_t(t, scale=1.0):
        return scale * (2 + 6 * torch.exp(-((t.log() - math.log(t_star)) ** 2) / (2 * 0.25**2)))

    t = torch.exp(torch.linspace(math.log(10.0), math.log(0.1), 41, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    xi_eq = torch.empty(3, len(t), dtype=torch.float64)
    for n, scale in enumerate((0.9, 1.0, 1.1)):                             # three "trajectories"
        model = _Dispersion(size, lambda tt, s=scale: xi_of_t(tt, s))
        x = torch.randn(len(t), 1, size, size, generator=g, dtype=torch.float64)   # the state is irrelevant
        soft = cr.mode_softening(model, x, torch.exp(-t), method="jvp")
        torch.testing.assert_close(soft.xi_eq, xi_of_t(t, scale), rtol=1e-8, atol=1e-8)
        xi_eq[n] = soft.xi_eq
    peak = cr.critical_time_from_xi_eq(xi_eq, t)
    assert peak.t == pytest.approx(t_star, rel=0.06)                      # the grid point nearest t*
    assert peak.index == int(torch.argmin((t.log() - math.log(t_star)).abs()))
    assert peak.value == pytest.approx(8.0, rel=1e-2)                      # the median trajectory's peak


# ---- 8. critical-time theory: spectral criterion, speciation, the table -------------------------------------------

def _checkerboard(p: int) -> torch.Tensor:
    i = torch.arange(p)
    return ((i[:, None] + i[None, :]) % 2 * 2 - 1).to(torch.float64)


def test_spectral_criterion_on_a_dictionary_with_closed_form_covariance():
    p, w1, w2 = 3, 0.9, 0.1
    u, c = torch.ones(p, p, dtype=torch.float64), _checkerboard(p)
    patterns = torch.stack([u, -u, c, -c])
    priors = torch.tensor([w1 / 2, w1 / 2, w2 / 2, w2 / 2], dtype=torch.float64)
    # ± symmetric: μ = 0 and C = w1 uuᵀ + w2 ccᵀ (eq. 30 with the prior as weights)
    uf, cf = u.flatten(), c.flatten()
    expected = w1 * torch.outer(uf, uf) + w2 * torch.outer(cf, cf)
    cov = cr.patch_covariance(patterns, priors)
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-14)
    # its non-zero eigenvalues are those of the 2×2 Gram matrix [[w1 u·u, √(w1w2) u·c], [·, w2 c·c]]
    a, d, b = w1 * p * p, w2 * p * p, math.sqrt(w1 * w2) * float(uf @ cf)
    lam = (a + d) / 2 + math.sqrt(((a - d) / 2) ** 2 + b * b)
    assert cr.top_eigenvalue(cov) == pytest.approx(lam, rel=1e-13)
    # σ²(t_c) = α²(t_c)·λ_max (eq. 43): t_c = log(1 + λ) on the constant schedule, ᾱ = 1/(1+λ) on any schedule
    assert cr.critical_time_spectral(lam) == pytest.approx(math.log1p(lam), rel=1e-15)
    assert cr.critical_time_spectral(lam, ConstantVPSchedule(beta=2.0)) == pytest.approx(math.log1p(lam) / 2)
    for name in ("cosine", "linear"):
        sched = sf.schedules.get_schedule(name)
        tc = torch.tensor(cr.critical_time_spectral(lam, name), dtype=torch.float64)
        ab = float(sched.alpha_bar(tc))
        assert 1 - ab == pytest.approx(ab * lam, rel=1e-9)                # σ² = α² λ_max
    # the rank-one two-state dictionary: λ_max(C) = |Ω| and the spectral t_c is the tree-level one
    two = cr.patch_covariance(torch.stack([torch.ones(5, 5), -torch.ones(5, 5)]))
    assert cr.top_eigenvalue(two) == pytest.approx(25.0, rel=1e-14)
    assert cr.critical_time_spectral(cr.top_eigenvalue(two)) == pytest.approx(cr.critical_time_two_state(25))
    # uniform priors over ±ξ^a: C = (1/M) Σ_a ξ^a ξ^aᵀ (eq. 30)
    g = torch.Generator().manual_seed(4)
    xi = torch.randint(0, 2, (4, 5, 5), generator=g).to(torch.float64) * 2 - 1
    flat = xi.flatten(1)
    torch.testing.assert_close(cr.patch_covariance(torch.cat([xi, -xi])), flat.T @ flat / 4, rtol=0, atol=1e-13)


def test_table_two_state_critical_time_is_log_one_plus_omega():
    for area in (9, 25, 49):
        rows = cr.critical_time_table("constant", patch_area=area)
        row = next(r for r in rows if r["estimate"].startswith("two-state"))
        assert row["t"] == cr.critical_time_two_state(area) == math.log1p(area)
        assert row["alpha_bar"] == pytest.approx(1 / (1 + area), rel=1e-15)
        assert row["sigma_ve"] == pytest.approx(math.sqrt(area), rel=1e-12)
        assert row["t_over_two_state"] == 1.0
    # another schedule: the same ᾱ = 1/26 at its own time
    row = cr.critical_time_table("cosine", patch_area=25)[0]
    assert row["alpha_bar"] == pytest.approx(1 / 26, rel=1e-9)
    # the paper's dictionary: every estimate present, measured rows appended
    from scorefield.data.synthetic import make_patch_dictionary

    d = make_patch_dictionary()
    rows = cr.critical_time_table("constant", 25, d.patterns, d.priors, (80, 80), data_eigenvalue=30.0,
                                  measured=[("argmax ξ_eq", 3.0, "")])
    assert [r["kind"] for r in rows].count("theory") == 7 and rows[-1]["kind"] == "measured"
    assert set(rows[0]) == set(cr.TABLE_COLUMNS)
    spectral = next(r for r in rows if r["estimate"].startswith("spectral"))
    assert spectral["t"] == pytest.approx(math.log1p(cr.top_eigenvalue(cr.patch_covariance(d.patterns, d.priors))))
    assert 3.0 < spectral["t"] < math.log(26)                             # λ_max ≈ 22.6 < |Ω|


def test_speciation_time_conversion():
    lam = 40.0
    assert cr.speciation_time(lam) == pytest.approx(math.log(lam), rel=1e-15)           # t_s = 2 t_S at β = 1
    assert cr.speciation_time(lam, ConstantVPSchedule(beta=2.0)) == pytest.approx(0.5 * math.log(lam))   # = t_S
    sched = sf.schedules.get_schedule("cosine")
    ts = torch.tensor(cr.speciation_time(lam, "cosine"), dtype=torch.float64)
    assert float(sched.alpha_bar(ts)) == pytest.approx(1 / lam, rel=1e-9)
    assert cr.speciation_alpha_bar(lam) == 1 / lam
    # the spectral criterion with λ_max = Λ lies later in t by log((1+Λ)/Λ)
    assert cr.critical_time_spectral(lam) - cr.speciation_time(lam) == pytest.approx(math.log((1 + lam) / lam))
    with pytest.raises(ValueError, match="data_eigenvalue"):
        cr.speciation_time(0.8)


def test_data_covariance_top_eigenvalue_routes_agree():
    # the two-state images {+1, −1} (L×L): covariance 11ᵀ, Λ = L²
    two = torch.cat([torch.ones(3, 1, 6, 6), -torch.ones(3, 1, 6, 6)])
    assert cr.data_covariance_top_eigenvalue(two) == pytest.approx(36.0, rel=1e-12)
    assert cr.data_covariance_top_eigenvalue(two, stationary=True) == pytest.approx(36.0, rel=1e-12)
    # all H·W translates of a few fields: the sample covariance is exactly circulant, both routes agree
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)
    rolled = torch.stack([torch.roll(base, (a, b), (-2, -1)) for a in range(6) for b in range(6)]).flatten(0, 1)
    full = cr.data_covariance_top_eigenvalue(rolled)
    assert cr.data_covariance_top_eigenvalue(rolled, stationary=True) == pytest.approx(full, rel=1e-10)
    # fewer images than pixels: the Gram route gives the same non-zero spectrum
    few = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)
    flat = few.flatten(1) - few.flatten(1).mean(0)
    assert cr.data_covariance_top_eigenvalue(few) == pytest.approx(
        float(torch.linalg.eigvalsh(flat.T @ flat / 5)[-1]), rel=1e-10)
    # patch covariance of images: two-state images have C = 11ᵀ, λ_max = P²
    cov = cr.patch_covariance_of_images(two, 3)
    assert cr.top_eigenvalue(cov) == pytest.approx(9.0, rel=1e-12)
    valid = cr.patch_covariance_of_images(few, 3, padding="valid")
    cols = torch.nn.functional.unfold(few, 3).permute(0, 2, 1).reshape(-1, 9)
    torch.testing.assert_close(valid, torch.cov(cols.T, correction=0), rtol=1e-10, atol=1e-12)


# ---- 9. the dictionary machine: convolutional form and its zero-field instability ---------------------------------

@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_convolutional_dictionary_equals_the_machine(padding):
    g = torch.Generator().manual_seed(6)
    patterns = torch.randint(0, 2, (6, 2, 3, 3), generator=g).float() * 2 - 1      # two channels, no symmetry
    priors = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    data = sf.data.load("two-image", size=9)
    data2 = sf.data.ImageSet(data.images.expand(-1, 2, -1, -1).clone(), name="two")
    machine = sf.models.make("dictionary", data2, patterns=patterns, priors=priors, padding=padding,
                             dtype="float64")
    fast = cr.PatchDictionaryDenoiser.from_machine(machine)
    x = torch.randn(3, 2, 9, 11, generator=g, dtype=torch.float64)
    for ab in (1e-3, 0.1, 0.5, 0.95):
        torch.testing.assert_close(fast(x, ab), machine(x, ab), rtol=1e-11, atol=1e-11)
    direct = cr.PatchDictionaryDenoiser(patterns, priors, padding=padding)
    torch.testing.assert_close(direct(x, 0.3), machine(x, 0.3), rtol=1e-6, atol=1e-6)   # float32 log-priors
    with pytest.raises(ValueError, match="machine"):
        cr.PatchDictionaryDenoiser.from_machine(sf.models.make("tanh", data))


def test_dictionary_machine_uniform_mode_changes_sign_at_log_one_plus_response():
    from scorefield.data.synthetic import make_patch_dictionary

    d = make_patch_dictionary(patch_size=3, n_random=4, global_mass=0.7, seed=2)
    data = sf.data.load("two-image", size=9)
    machine = sf.models.make("dictionary", data, patterns=d.patterns, priors=d.priors, dtype="float64")
    fast = cr.PatchDictionaryDenoiser.from_machine(machine)
    k0 = float(cr.dictionary_response_kernel(fast.patterns, fast.priors).sum())           # K̂(0)
    t = torch.linspace(0.3, 5.0, 9, dtype=torch.float64)
    a2, s2 = torch.exp(-t), -torch.expm1(-t)
    torch.testing.assert_close(cr.uniform_mode_eigenvalue(machine, a2), 1 / s2 - a2 * k0 / s2**2,
                               rtol=1e-9, atol=1e-9)
    # r(t) = 0 at t = log(1 + K̂(0)); on a lattice where k = 0 is the most unstable mode that is the zero-field row
    tc = math.log1p(k0)
    assert cr.uniform_mode_eigenvalue(machine, math.exp(-(tc - 1e-3))).item() < 0 < \
        cr.uniform_mode_eigenvalue(machine, math.exp(-(tc + 1e-3))).item()
    assert cr.zero_field_max_response(fast.patterns, fast.priors, (9, 9)) >= k0 - 1e-12
    # the ξ_eq divergence of the reverse-SDE drift: λ_0 = −½ + r(0) = 0 at ᾱ = √(K²+1) − K
    ab = cr.zero_field_softening_alpha_bar(k0)
    soft = cr.mode_softening(machine, torch.zeros(1, 1, 9, 9, dtype=torch.float64), ab, shells=3)
    assert abs(soft.lambdas[0, 0].item()) < 1e-9
