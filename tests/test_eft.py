"""The EFT of the ELS machine (EFT paper App. A.2–A.3): bank sums against autograd, symmetries, the tanh machine,
the heat equation from white noise, and the EFT as a denoiser."""
import math

import numpy as np
import pytest
import torch

import scorefield as sf
from scorefield.analysis import eft
from scorefield.engine import extract_patches

F64 = torch.float64


def _images(n=8, c=1, size=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=gen) * 2 - 1


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- App. A.2: bank sums against the machine's own derivatives ---------------------------------------------------

@pytest.fixture(scope="module")
def random_els():
    """ELS (P = 3, circular) on 8 random 10×10 images, linearized by autograd at three ᾱ."""
    data = sf.data.ImageSet(_images())
    machine = sf.models.make("els", data, patch_size=3, dtype="float64")
    ab = torch.tensor([0.05, 0.3, 0.7], dtype=F64)
    return machine, ab, eft.linearize(machine, ab)


def test_bank_sums_equal_the_machine_jacobian_exactly(random_els):
    machine, ab, lin = random_els
    bank = eft.eft_coefficients(machine, ab)
    # the kernel K(δ) = √ᾱ/(1−ᾱ)·Cov_π(ϕ(0), ϕ(δ)) is the machine's Jacobian row, so every moment agrees
    torch.testing.assert_close(bank["kernel"], lin["kernel"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bank["d00"], lin["d00"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bank["d10"], lin["d10"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bank["a10"], lin["a10"], rtol=0, atol=1e-11)
    assert (lin["outside"] == 0).all()                         # the ELS is local: nothing outside the patch
    assert bank["kernel"].abs().max() > 0.1 and bank["d11"].abs().max() > 1e-2    # not trivially zero


def test_plane_wave_coefficients_agree_within_the_truncation_bound(random_els):
    """d11 from the O(k) and d12 from the O(k²) response to plane waves of k = 0.01: the error of dropping O(k³)
    is bounded by (k²/6)Σ|K||δ^μ|³ (d11) and (k²/24)Σ|K|(δ^μ)⁴ (d12) (see `linearize`)."""
    machine, ab, lin = random_els
    bank = eft.eft_coefficients(machine, ab)
    for key in ("d11", "d12"):
        err = (bank[key] - lin[key]).abs()
        assert (err <= lin["truncation"][key]).all(), (key, err.max(), lin["truncation"][key].max())
        assert lin["truncation"][key].max() < 1e-3 * bank[key].abs().max() * 10   # the bound is tight enough
    # the score's coefficients follow (eq. 29–32): a = (√ᾱ d − δ_{m1,n0})/(1−ᾱ)
    scale = (ab.sqrt() / (1 - ab))[:, None, None, None, None]
    torch.testing.assert_close(lin["a12"], scale * lin["d12"])
    torch.testing.assert_close(bank["a00"], (ab.sqrt() / (1 - ab))[:, None] * bank["d00"])


def test_two_channel_bank_sums_around_a_constant_field():
    """Cross-channel kernel K_{cc'} and a non-zero constant background c (the expansion around φ = c)."""
    data = sf.data.ImageSet(_images(n=4, c=2, size=8, seed=3))
    machine = sf.models.make("els", data, patch_size=3, dtype="float64")
    ab = torch.tensor([0.2, 0.6], dtype=F64)
    background = [0.3, -0.2]
    lin = eft.linearize(machine, ab, background=background)
    bank = eft.eft_coefficients(machine, ab, background=background)
    assert bank["kernel"].shape == (2, 2, 2, 3, 3) and bank["d12"].shape == (2, 2, 2, 2, 2)
    torch.testing.assert_close(bank["kernel"], lin["kernel"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bank["d00"], lin["d00"], rtol=0, atol=1e-12)
    assert bank["kernel"][:, 0, 1].abs().max() > 1e-2           # channels do mix
    assert (bank["d00"] - eft.eft_coefficients(machine, ab)["d00"]).abs().max() > 1e-2   # c matters


def test_constant_field_response_within_its_second_order_bound():
    """x̂₀(c·1) = d00 + d10·c + R, |R| ≤ m³D²(√ᾱ/(1−ᾱ))²c² (the third cumulant of the bank under π, pixels in
    [−m, m], D = C·P² values per patch); R shrinks as c²."""
    data = sf.data.ImageSet(_images(size=8))
    machine = sf.models.make("els", data, patch_size=3, dtype="float64")
    ab = 0.1
    coeffs = eft.eft_coefficients(machine, ab)
    lam, dim, m = math.sqrt(ab) / (1 - ab), 9, float(data.images.abs().max())
    rest = []
    for c in (2e-2, 1e-2):
        with torch.no_grad():
            out = machine(torch.full((1, 1, 8, 8), c, dtype=F64), ab)[0, 0, 4, 4]
        r = abs(float(out - coeffs["d00"][0] - coeffs["d10"][0, 0] * c))
        assert r <= m**3 * dim**2 * lam**2 * c**2
        rest.append(r)
    assert 3.5 < rest[0] / rest[1] < 4.5                       # second order in c


def test_plane_wave_error_is_second_order_in_k():
    data = sf.data.load("two-image", size=9)
    tanh = sf.models.make("tanh", data, patch_size=3)
    exact = eft.eft_coefficients(data, 0.3, patch_size=3)["d12"]
    errs = []
    for k in (0.2, 0.1):
        lin = eft.linearize(tanh, 0.3, wavenumber=k)
        err = (lin["d12"] - exact).abs()
        bound = lin["truncation"]["d12"]
        assert (err <= bound).all()
        assert err[..., 0, 0].max() >= 0.9 * bound[..., 0, 0].max()   # a positive kernel nearly attains the bound
        errs.append(float(err[..., 0, 0].max()))
    assert 3.8 < errs[0] / errs[1] < 4.2


# ---- symmetries -----------------------------------------------------------------------------------------------

def test_z2_symmetric_data_has_no_constant_term():
    ab = torch.tensor([0.01, 0.3, 0.9], dtype=F64)
    base = _images(n=4, size=8, seed=1)
    for data in (sf.data.ImageSet(torch.cat([base, -base])), sf.data.load("two-image", size=8)):
        coeffs = eft.eft_coefficients(data, ab, patch_size=3)
        assert coeffs["a00"].abs().max() < 1e-12 and coeffs["d00"].abs().max() < 1e-12
    assert eft.eft_coefficients(sf.data.ImageSet(base), ab, patch_size=3)["a00"].abs().max() > 1e-2


def test_rotation_closed_data_is_isotropic():
    """Data closed under 90° rotations: a11 = 0 and a12^{μν} ∝ δ^{μν} (App. A.2, last paragraph)."""
    ab = torch.tensor([0.3, 0.7], dtype=F64)
    base = _images(n=4, size=8, seed=2)
    rotated = torch.cat([torch.rot90(base, k, (-2, -1)) for k in range(4)])
    for patch in (3, 5):
        iso = eft.eft_coefficients(sf.data.ImageSet(rotated), ab, patch_size=patch)
        a12 = iso["a12"][:, 0, 0]                                  # [A, 2, 2]
        assert iso["a11"].abs().max() < 1e-12
        assert a12[:, 0, 1].abs().max() < 1e-12 and (a12[:, 0, 0] - a12[:, 1, 1]).abs().max() < 1e-12
        assert a12[:, 0, 0].abs().min() > 1e-3                     # ∝ δ^{μν} with a non-zero factor
    plain = eft.eft_coefficients(sf.data.ImageSet(base), ab, patch_size=3)
    assert plain["a11"].abs().max() > 1e-2
    assert (plain["a12"][..., 0, 0] - plain["a12"][..., 1, 1]).abs().max() > 1e-2


def test_a11_vanishes_at_leading_order_for_any_circular_bank():
    """Without any symmetry, d11/d12 = O(ᾱ): the uniform-weight bank covariance is even in δ, only the b00
    reweighting (eq. 22) makes a gradient term (beyond the paper, which needs rotations for a11 = 0)."""
    data = sf.data.ImageSet(_images(size=12))
    coeffs = eft.eft_coefficients(data, torch.tensor([1e-4, 1e-2], dtype=F64), patch_size=3)
    ratio = coeffs["d11"].flatten(1).abs().max(1).values / coeffs["d12"].flatten(1).abs().max(1).values
    assert ratio[0] < 1e-3
    assert 0.5e-2 < ratio[0] / ratio[1] < 2e-2                   # ∝ ᾱ


def test_flow_coefficients_approach_the_bank_covariance():
    """∂φ/∂ᾱ = (φ + M)/2ᾱ (eq. 1 with ½): as ᾱ → 0, g12 → ¼Σ_δ C(δ)δ^μδ^ν and g10 → (Σ_δ C(δ) − 1)/2, C the
    uniform patch covariance — computed here independently from all circular patches."""
    images = _images(size=8, seed=4).double()
    coeffs = eft.eft_coefficients(sf.data.ImageSet(images), 1e-8, patch_size=3)
    flow = eft.flow_coefficients(coeffs)
    patches = extract_patches(images, 3, "circular").reshape(-1, 9)               # [N·HW, 9]
    cov = ((patches[:, 4:5] - patches[:, 4:5].mean()) * (patches - patches.mean(0))).mean(0).reshape(3, 3)
    delta = eft.offsets(3)
    g12 = 0.25 * torch.einsum("ij,ijm,ijn->mn", cov, delta, delta)
    torch.testing.assert_close(flow["g12"][0, 0], g12, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(flow["g10"][0, 0], (cov.sum() - 1) / 2, rtol=1e-6, atol=1e-12)


# ---- the two-state tanh machine (eq. 11) ------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [3, 5])
def test_tanh_machine_linearization_equals_the_bank(patch):
    """{all +1, all −1}: x̂₀ = tanh(√ᾱ Σ_Ω φ/(1−ᾱ)) ≈ √ᾱ/(1−ᾱ)·Σ_Ω φ, so K(δ) = √ᾱ/(1−ᾱ) on the patch,
    d10 = √ᾱ P²/(1−ᾱ), d11 = 0, d12^{μν} = √ᾱ/(1−ᾱ)·½ P Σ_{d=−r}^{r} d² δ^{μν}."""
    data = sf.data.load("two-image", size=10)
    ab = torch.tensor([0.01, 0.3, 0.8], dtype=F64)
    lam = ab.sqrt() / (1 - ab)
    r = patch // 2
    second = 0.5 * patch * sum(d * d for d in range(-r, r + 1))
    bank = eft.eft_coefficients(data, ab, patch_size=patch)
    torch.testing.assert_close(bank["d10"][:, 0, 0], lam * patch**2, rtol=1e-14, atol=0)
    torch.testing.assert_close(bank["d12"][:, 0, 0], lam[:, None, None] * second * torch.eye(2, dtype=F64),
                               rtol=1e-14, atol=1e-13)
    assert bank["d11"].abs().max() < 1e-13
    tanh = eft.linearize(sf.models.make("tanh", data, patch_size=patch), ab)
    torch.testing.assert_close(tanh["kernel"], bank["kernel"], rtol=1e-13, atol=0)
    els = eft.eft_coefficients(sf.models.make("els", data, patch_size=patch), ab)   # from the machine's bank
    torch.testing.assert_close(els["kernel"], bank["kernel"], rtol=1e-13, atol=0)


# ---- shapes, streaming, errors ------------------------------------------------------------------------------------

def test_scalar_and_array_alpha_bar_and_streamed_chunks():
    data = sf.data.ImageSet(_images(size=12))
    ab = torch.tensor([0.1, 0.5], dtype=F64)
    full = eft.eft_coefficients(data, ab, patch_size=3)
    one = eft.eft_coefficients(data, 0.5, patch_size=3)
    assert one["a12"].shape == (1, 1, 2, 2) and full["a12"].shape == (2, 1, 1, 2, 2)
    assert one["alpha_bar"].ndim == 0 and full["alpha_bar"].shape == (2,)
    for key in eft.COEFFICIENT_KEYS:
        torch.testing.assert_close(one[key], full[key][1], rtol=1e-13, atol=1e-15)
    budget = 8 * 2 * 144 * (4 * 9 + 2 * 2 + 2 * 1 + 2)           # two of the 8 images per chunk
    assert eft._chunk_keys(9, 1, 2, budget) < 8 * 144
    streamed = eft.eft_coefficients(data, ab, patch_size=3, memory_budget=budget)
    for key in eft.COEFFICIENT_KEYS:
        torch.testing.assert_close(streamed[key], full[key], rtol=1e-12, atol=1e-14)


def test_clear_errors_for_bad_input():
    data = sf.data.ImageSet(_images(size=8))
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan"), [[0.5]], []):
        with pytest.raises(ValueError, match="alpha_bar"):
            eft.eft_coefficients(data, bad, patch_size=3)
    for bad in (4, 0, 9, 3.0):
        with pytest.raises(ValueError, match="patch_size"):
            eft.eft_coefficients(data, 0.5, patch_size=bad)
    with pytest.raises(ValueError, match="patch_size is required"):
        eft.eft_coefficients(data, 0.5)
    with pytest.raises(ValueError, match=r"\[N>0, C, H, W\]"):
        eft.eft_coefficients(torch.zeros(8, 8), 0.5, patch_size=3)
    with pytest.raises(ValueError, match="background"):
        eft.eft_coefficients(data, 0.5, patch_size=3, background=[0.1, 0.2])
    with pytest.raises(ValueError, match="grouping"):
        eft.eft_coefficients(sf.models.make("ls", data, patch_size=3), 0.5)
    with pytest.raises(ValueError, match="linearize"):
        eft.eft_coefficients(sf.models.make("tanh", data, patch_size=3), 0.5)
    with pytest.raises(ValueError, match="from the machine"):
        eft.eft_coefficients(sf.models.make("els", data, patch_size=3), 0.5, patch_size=3)
    with pytest.raises(ValueError, match="seam"):
        eft.linearize(sf.models.make("tanh", data, patch_size=9), 0.5)
    with pytest.raises(ValueError, match="wavenumber"):
        eft.linearize(sf.models.make("tanh", data, patch_size=3), 0.5, wavenumber=2.0)
    with pytest.raises(ValueError, match="order"):
        eft.eft_model(data, patch_size=3, order=3)
    with pytest.raises(ValueError, match="image_shape"):
        eft.eft_model({"alpha_bar": torch.tensor([0.5])})
    with pytest.raises(ValueError, match="unstable"):
        eft.simulate_heat_equation((8, 8), 10, 0.5, D=1.0, method="euler")
    with pytest.raises(ValueError, match="method"):
        eft.lattice_heat_two_point((8, 8), 10, 0.1, method="rk4")
    with pytest.raises(ValueError, match="fields"):
        eft.empirical_two_point(torch.zeros(1, 8))


# ---- App. A.3: the heat equation from white noise -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["exact", "euler"])
def test_lattice_simulation_matches_the_lattice_two_point(method):
    """200 periodic 32×32 fields at D·t = 2: every G(z) within 4 standard errors of σ²Σ_k|prop_k|²e^{ikz}/|Λ|."""
    shape, steps, dt = (32, 32), 10, 0.2
    fields = eft.simulate_heat_equation(shape, steps, dt, D=1.0, n=200, seed=0, method=method)
    emp, err = eft.empirical_two_point(fields)
    exact = eft.lattice_heat_two_point(shape, steps, dt, method=method)
    z = (emp - exact) / err
    assert z.abs().max() < 4
    assert abs(float(exact.sum()) - 1.0) < 1e-12                 # Σ_z G = σ² Ĝ(0) = σ²: the k = 0 mode is conserved
    other = eft.lattice_heat_two_point(shape, 5, dt, method=method)
    assert ((emp - other) / err).abs().max() > 10                # a wrong time is detected


def test_lattice_two_point_converges_to_the_continuum_form():
    """G_lattice → σ²(8πDt)^{−1} e^{−|z|²/8Dt} in 2-D (eq. 41 corrected), the error ≈ 1/(16Dt) of G(0)."""
    shape = (64, 64)
    z = eft.lattice_separations(shape)
    errors = []
    for dt in (2.0, 4.0, 8.0, 16.0):
        lattice = eft.lattice_heat_two_point(shape, 1, dt, D=1.0, sigma=2.0)
        continuum = eft.heat_equation_two_point(z, dt, D=1.0, sigma=2.0)
        errors.append(float((lattice - continuum).abs().max() / continuum.max()))
        assert errors[-1] < 1.3 / (16 * dt)
    assert errors[1] < 0.02 and errors[-1] < errors[0] / 6
    # the continuum form is a normalized Gaussian of total mass σ²
    assert abs(float(eft.heat_equation_two_point(z, 4.0, sigma=2.0).sum()) - 4.0) < 1e-6


def test_simulation_rejects_eq41_as_printed():
    """1-D, D = σ = 1, t = 4: the simulation agrees with (8πt)^{−1/2}e^{−z²/8t} and not with √(π/2t)e^{−π²z²/2t},
    which is 2π times larger at z = 0."""
    fields = eft.simulate_heat_equation((256,), 1, 4.0, n=400, seed=1)
    emp, err = eft.empirical_two_point(fields)
    z = eft.lattice_separations((256,))
    near = z[:, 0].abs() <= 10
    derived = eft.heat_equation_two_point(z, 4.0)
    printed = eft.paper_eq41_two_point(z[:, 0], 4.0)
    assert ((emp - derived) / err)[near].abs().max() < 4
    assert ((emp - printed) / err)[0].abs() > 50
    assert abs(float(printed[0] / derived[0]) - 2 * math.pi) < 1e-12


# ---- the EFT as a denoiser -----------------------------------------------------------------------------------

def test_lattice_derivatives_on_a_lattice_mode():
    """Central differences of e^{ik·x}: ∂_μ → i sin k_μ, ∂_μ² → −(2 − 2cos k_μ), ∂_0∂_1 → −sin k_0 sin k_1."""
    size, m = 12, (1, 2)
    k = [2 * math.pi * v / size for v in m]
    y, x = torch.meshgrid(torch.arange(size, dtype=F64), torch.arange(size, dtype=F64), indexing="ij")
    phase = k[0] * y + k[1] * x
    grad_c, hess_c = eft.lattice_derivatives(torch.cos(phase)[None, None])
    torch.testing.assert_close(grad_c[0, 0, 0], -math.sin(k[0]) * torch.sin(phase))
    torch.testing.assert_close(hess_c[0, 0, 1, 1], -(2 - 2 * math.cos(k[1])) * torch.cos(phase))
    torch.testing.assert_close(hess_c[0, 0, 0, 1], -math.sin(k[0]) * math.sin(k[1]) * torch.cos(phase))


def _smooth_field(size, amplitude):
    k = 2 * math.pi / size
    y = torch.arange(size, dtype=F64)
    field = torch.cos(k * y)[:, None] + 0.5 * torch.sin(k * y[None, :] + 0.3) + 0.3 * torch.cos(k * (y[:, None] + y))
    return amplitude * field[None, None]


def test_eft_denoiser_matches_the_machine_on_smooth_small_fields():
    """At small ᾱ the EFT x̂₀ = d00 + d10φ + d11∂φ + d12∂∂φ (finite differences) is the ELS x̂₀ on a smooth field of
    amplitude 0.1 on a 16×16 lattice: relative error of the response x̂₀(φ) − x̂₀(0) measured ≤ 5.3e-4 (bound 1e-3).
    On white noise the linearized kernel (all derivative orders) still is (measured 2.7e-3 at ᾱ = 1e-3, bound 5e-3;
    the quadratic term of the non-symmetric data), the truncated derivative expansion is not (≈ 10%): the EFT is
    a long-wavelength description."""
    data = sf.data.ImageSet(_images(size=16))
    machine = sf.models.make("els", data, patch_size=3, dtype="float64")
    model = eft.eft_model(machine)
    kernel_model = eft.eft_model(machine, operator="kernel")
    x = _smooth_field(16, 0.1)
    noise = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        for ab in (0.01, 0.05):
            zero = machine(torch.zeros_like(x), ab)
            response = machine(x, ab) - zero
            assert _rel(model(x, ab) - zero, response) < 1e-3
        ab = 1e-3
        response = machine(noise, ab) - machine(torch.zeros_like(x), ab)
        d00 = model(torch.zeros_like(x), ab)
        assert _rel(kernel_model(noise, ab) - d00, response) < 5e-3
        assert _rel(model(noise, ab) - d00, response) > 0.03


def test_sampling_the_eft_from_the_machines_noise():
    """`sf.sampling.sample` runs the EFT; with Z2 data (d00 = 0) the reverse process is linear in the noise, and
    over the first steps (ᾱ ≤ 0.024) the linearized machine follows the ELS from the same noise (measured 0.26%)."""
    base = _images(n=4, size=8, seed=6)
    data = sf.data.ImageSet(torch.cat([base, -base]))
    machine = sf.models.make("els", data, patch_size=3, dtype="float64")
    model = eft.eft_model(data, patch_size=3)
    gen = torch.Generator().manual_seed(7)
    n1, n2 = (torch.randn(2, 1, 8, 8, generator=gen, dtype=F64) for _ in range(2))
    ts = torch.linspace(1, 0.9, 5, dtype=F64)
    s1, s2 = sf.sampling.sample(model, n1, ts=ts), sf.sampling.sample(model, n2, ts=ts)
    torch.testing.assert_close(sf.sampling.sample(model, n1 + 2 * n2, ts=ts), s1 + 2 * s2, rtol=0, atol=1e-12)
    assert torch.isfinite(s1).all() and s1.shape == n1.shape
    linear = eft.eft_model(data, patch_size=3, operator="kernel")
    els = sf.sampling.sample(machine, n1, ts=ts)
    blind = sf.sampling.sample(lambda x, ab, labels=None: torch.zeros_like(x), n1, ts=ts)
    assert _rel(sf.sampling.sample(linear, n1, ts=ts) - blind, els - blind) < 0.01


def test_tabulated_coefficients_interpolate_in_alpha_bar():
    data = sf.data.ImageSet(_images(size=8))
    grid = torch.tensor([0.01, 0.02, 0.05], dtype=F64)
    table = eft.eft_coefficients(data, grid, patch_size=3)
    tabulated = eft.eft_model(table, image_shape=(1, 8, 8))
    direct = eft.eft_model(data, patch_size=3)
    x = _smooth_field(8, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(tabulated(x, 0.02), direct(x, 0.02), rtol=0, atol=1e-14)
        assert _rel(tabulated(x, 0.03), direct(x, 0.03)) < 2e-2
        with pytest.raises(ValueError, match="tabulated range"):
            tabulated(x, 0.2)


def test_linearized_eft_reproduces_the_machines_correlations_at_the_earliest_times():
    """The EFT prediction as a model, run from the same noise as the machine: its ρ(|x−y|, t) equals the machine's
    within the bootstrap error while ᾱ ≤ 0.01, and departs from it later (the nonlinear terms grow)."""
    info = sf.analysis.information
    data = sf.data.load("two-image", size=12)
    els = sf.models.make("els", data, patch_size=3, dtype="float64")
    linear = sf.analysis.eft.eft_model(els, operator="kernel")
    noise = sf.sampling.initial_noise(256, (1, 12, 12), seed=0).double()
    ts = torch.cat([torch.linspace(1.0, 0.75, 7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    res = {name: info.two_point(info.record(m, noise, ts=ts, times=ts[1:-1].tolist(), progress=False), bootstrap=50)
           for name, m in (("els", els), ("eft", linear))}
    early = res["els"].alpha_bar <= 0.01
    late = res["els"].alpha_bar >= 0.08
    gap = np.abs(res["eft"].rho[:, :4] - res["els"].rho[:, :4])                  # [T, r ≤ 4 pixels]
    err = res["els"].rho_err[:, :4] + res["eft"].rho_err[:, :4]
    assert early.any() and late.any()
    assert (gap[early] <= 3 * err[early] + 1e-4).all()
    assert gap[late].max() > 5 * err[late].max()
