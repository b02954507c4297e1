"""Component-wise forward processes (RG slides): exact truths.

Standard diffusion is recovered exactly (equal ᾱ_k, S = I: marginals, forward samples, training, samplers); the
per-component marginals equal their closed form and Monte Carlo estimates (of the forward draws and of the SDE
itself); the Gaussian score of coloured Gaussian data is exact under every process (against autograd of the
dense Gaussian marginal); the bases are orthonormal; the heat-dissipation preset's marginals are Rissanen et al.'s
DCT blur and the blurring preset's are Hoogeboom & Salimans'; the ideal denoiser is the ideal score machine.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.fft
import torch

import scorefield as sf
from scorefield import cli
from scorefield.data.synthetic import power_law_spectrum
from scorefield.forward import DataStatistics, ProcessError, make, make_basis
from scorefield.forward.denoisers import GaussianProcessDenoiser, NetProcessDenoiser
from scorefield.forward.schedules import blurring_noise_scaling
from scorefield.schedules import get_schedule
from scorefield.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 4, 4)


def coloured_gaussian(n: int = 400, shape=SHAPE, seed: int = 1):
    """A coloured Gaussian: stationary power law (1/k²) plus a non-stationary part, nonzero mean; returns
    (ImageSet of n draws, mean [D], covariance [D, D]) — the process is built on the draws, the truth is (μ, Σ)."""
    C, H, W = shape
    d = C * H * W
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(H * W, dtype=torch.float64).reshape(-1, H, W)
    P = power_law_spectrum(H, 2.0) + 0.05
    circulant = torch.fft.ifft2(torch.fft.fft2(eye) * P).real.reshape(H * W, H * W)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = 0.02 * torch.block_diag(*([circulant] * C)) + 0.002 * (A @ A.T) / d
    mu = 0.05 * torch.randn(d, generator=g, dtype=torch.float64)
    x = mu + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return sf.data.ImageSet(x.reshape(n, *shape).clamp(-1, 1).float(), name="coloured"), mu, cov


DATA, MU, COV = coloured_gaussian()

PROCESSES = [
    ("standard", {}),
    ("component", {"basis": "fourier"}),
    ("matched", {}),
    ("rg-cutoff", {}),
    ("matched-rg", {}),
    ("matched-rg", {"spread": 25.0}),
    ("component", {"basis": "pca", "schedule": "rg-cutoff", "colour": "matched"}),
    ("component", {"basis": "pca", "whiten": True, "schedule": "rg-cutoff"}),
    ("component", {"basis": "haar", "schedule": "rg-cutoff", "colour": "matched"}),
    ("component", {"basis": "dct", "schedule": "equal", "colour": "matched", "base": "linear"}),
    ("heat-dissipation", {}),
    ("blurring", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in PROCESSES]
# scale by scale: some components are exactly clean (v = 0) at t > 0, where Tweedie gives no score
SHELL_PROCESSES = [("matched-scale-by-scale", {}), ("scale-by-scale", {"spread": 0.5}), ("wavelet", {})]
SHELL_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in SHELL_PROCESSES]


# ---- bases ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pixel", "fourier", "dct", "haar", "pca", "pca-whiten"])
@pytest.mark.parametrize("shape", [(1, 6, 6), (1, 8, 8), (2, 4, 6), (1, 28, 28)])
def test_bases_are_orthonormal_and_round_trip(name, shape):
    if name.startswith("pca") and shape[1] == 28:
        pytest.skip("PCA of 784 pixels needs more images than this test draws")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64 if not name.startswith("pca") else 200, *shape, generator=g) * 2 - 1
    b = make_basis(name.split("-")[0], x, whiten=name == "pca-whiten")
    Q = b.matrix
    assert (Q @ Q.T - torch.eye(b.dim, dtype=torch.float64)).abs().max() < 1e-12
    assert b.k_abs.shape == (b.dim,) and (b.k_abs >= 0).all()
    back = b.inverse(b.forward(x))                                                  # float32 round trip
    assert back.shape == x.shape and (back - x).abs().max() <= 1e-6


def test_fourier_basis_diagonalizes_stationary_covariances_with_its_abs_k():
    """|k| per component: a circulant covariance of spectrum P(|k|) is diag(P(|k_i|)) in the Fourier basis."""
    H = 8
    b = make_basis("fourier", image_shape=(1, H, H))
    eye = torch.eye(H * H, dtype=torch.float64).reshape(-1, H, H)
    k = torch.sqrt(torch.fft.fftfreq(H, 1 / H)[:, None] ** 2 + torch.fft.fftfreq(H, 1 / H)[None, :] ** 2)
    P = (1.0 / (1.0 + k**2)).to(torch.float64)
    cov = torch.fft.ifft2(torch.fft.fft2(eye) * P).real.reshape(H * H, H * H)
    in_basis = b.matrix @ cov @ b.matrix.T
    assert (in_basis - torch.diag(torch.diagonal(in_basis))).abs().max() < 1e-12
    assert torch.allclose(torch.diagonal(in_basis), 1.0 / (1.0 + b.k_abs**2), atol=1e-12)
    assert torch.equal(b.k_abs, torch.sort(b.k_abs).values)                        # sorted by |k|


def test_dct_and_haar_bases_are_the_standard_transforms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 6, 8, generator=g, dtype=torch.float64)
    dct = make_basis("dct", image_shape=(1, 6, 8))
    ref = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho").reshape(3, -1)
    assert np.abs(dct.forward(x).numpy() - ref).max() < 1e-12
    haar = make_basis("haar", image_shape=(1, 4, 4))
    c = haar.forward(torch.ones(1, 1, 4, 4, dtype=torch.float64)).reshape(4, 4)
    assert torch.allclose(c[0, 0], torch.tensor(4.0, dtype=torch.float64)) and c.abs().sum() == pytest.approx(4.0)
    step = torch.tensor([[1.0, -1.0, 0, 0], [1.0, -1.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    c = haar.forward(step[None, None]).reshape(4, 4)                                # one finest horizontal detail
    assert c[0, 2] == pytest.approx(2.0) and c.abs().sum() == pytest.approx(2.0)
    assert haar.options["levels"] == 2 and haar.k_abs.max() == pytest.approx(4 / 2**1.5)


def test_bases_refuse_what_they_cannot_do():
    with pytest.raises(sf.forward.BasisError, match="fourier"):
        make_basis("fourir", image_shape=SHAPE)
    with pytest.raises(sf.forward.BasisError, match="even"):
        make_basis("haar", image_shape=(1, 5, 5))
    with pytest.raises(sf.forward.BasisError, match="PCA"):
        make_basis("fourier", image_shape=SHAPE, whiten=True)
    with pytest.raises(sf.forward.BasisError, match="data"):
        make_basis("pca", image_shape=SHAPE)


# ---- standard diffusion recovered exactly -------------------------------------------------------------------

@pytest.mark.parametrize("basis", ["pixel", "fourier", "dct", "haar", "pca"])
@pytest.mark.parametrize("base", ["cosine", "linear"])
def test_equal_white_is_the_standard_vp_process_exactly(basis, base):
    proc = make("component", DATA, basis=basis, schedule="equal", colour="white", base=base)
    assert proc.is_standard
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    ab = get_schedule(base).alpha_bar(t).clamp(0, 1)
    m, v = proc.marginal(t)
    assert torch.equal(m, ab.sqrt()[:, None].expand_as(m)) and torch.equal(v, (1 - ab)[:, None].expand_as(v))
    m5, v5 = proc.marginal(0.5)
    assert m5.shape == (16,) and torch.equal(v5, v[5])
    # the same forward draw as the standard x_t = √ᾱ x₀ + √(1−ᾱ) ε (bit for bit in the pixel basis)
    x0, tt = DATA.images[:8], torch.rand(8, dtype=torch.float64)
    a = get_schedule(base).alpha_bar(tt).clamp(0, 1).to(torch.float32)[:, None, None, None]
    expected = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    got = proc.noise(x0, tt, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, expected) if basis == "pixel" else (got - expected).abs().max() < 1e-5
    # β_k equal: the SDE's drift is −½β with β = 2γ of the toolkit schedule, and S² = g²/β = 1
    tt = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    a_k, g2 = proc.drift_coefficients(tt)
    gamma = get_schedule(base).gamma(tt)[:, None]
    assert torch.allclose(a_k, -gamma.expand_as(a_k), rtol=1e-10) and torch.allclose(g2, 2 * gamma.expand_as(g2))


def test_rg_cutoff_with_zero_spread_is_the_equal_schedule():
    a = make("rg-cutoff", DATA, spread=0.0)
    b = make("component", DATA, basis="fourier")
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    assert torch.allclose(a.alpha_bar(t), b.alpha_bar(t), rtol=0, atol=1e-15)


@pytest.mark.parametrize("basis", ["pixel", "fourier"])
@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("ddim", {"eta": 0.6}), ("euler", {}), ("heun", {})])
def test_samplers_under_the_standard_process_are_the_toolkit_samplers(basis, sampler, options):
    model = sf.models.make("gaussian", DATA)
    proc = make("component", DATA, basis=basis)
    noise = sf.sampling.initial_noise(5, SHAPE, seed=0).double()
    ref = sf.sampling.sample(model, noise, steps=8, sampler=sampler, **options)
    got = sf.sampling.sample(model, noise, steps=8, sampler=sampler, process=proc, **options)
    if basis == "pixel" and sampler == "ddim" and not options:
        assert torch.equal(got, ref)
    assert (got - ref).abs().max() < 1e-12
    # the process's own (per-component) Gaussian denoiser gives the same samples
    own = sf.sampling.sample(sf.forward.gaussian_denoiser(proc, DATA), noise, steps=8, sampler=sampler,
                             process=proc, **options)
    assert (own - ref).abs().max() < 1e-10


def _small_set(n: int = 12, size: int = 8) -> sf.data.ImageSet:
    g = torch.Generator().manual_seed(0)
    return sf.data.ImageSet(torch.rand(n, 1, size, size, generator=g) * 2 - 1, name="small")


def _tiny(data, arch: str = "convnet"):
    torch.manual_seed(0)
    return sf.models.make(arch, data, preset="tiny")


def test_training_under_the_standard_process_gives_the_standard_weights_bit_for_bit(tmp_path):
    data = _small_set()
    options = dict(steps=6, batch_size=4, lr=1e-2, progress=False, seed=3, grad_clip=1.0)
    a = train(_tiny(data), data, run_dir=tmp_path / "a", **options)
    b = train(_tiny(data), data, run_dir=tmp_path / "b", process=make("standard", data), **options)
    assert a.final_loss == b.final_loss
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    x = sf.sampling.initial_noise(3, (1, 8, 8))
    assert torch.equal(sf.sampling.sample(a.model, x, steps=4),
                       sf.sampling.sample(b.model, x, steps=4, process=make("standard", data)))


# ---- marginals: closed form and Monte Carlo -----------------------------------------------------------------

def test_rg_cutoff_is_the_sigmoid_cutoff_sweeping_from_high_to_low_k():
    proc = make("matched-rg", DATA, spread=6.0)
    sched, k = proc.schedule, proc.basis.k_abs
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    ab, base = proc.alpha_bar(t), sched.base_alpha_bar(t)[:, None]
    lam, lam0 = sched.cutoff(t)[:, None], sched.cutoff(torch.zeros(1, dtype=torch.float64))
    K = torch.sigmoid((lam - k[None, :]) / sched.width) / torch.sigmoid((lam0 - k[None, :]) / sched.width)
    assert torch.allclose(ab, base * K, rtol=1e-12)                                  # ᾱ(t)·K_Λ(t)/K_Λ(0)
    assert sched.width == pytest.approx((k.max() - k.min()) / 6.0)
    assert torch.equal(proc.alpha_bar(torch.tensor([0.0], dtype=torch.float64)), torch.ones(1, 16, dtype=torch.float64))
    assert float(proc.alpha_bar(torch.tensor([1.0], dtype=torch.float64)).max()) < 1e-30
    assert (lam[1:] < lam[:-1]).all() and float(lam[0]) < float(lam0)               # Λ sweeps downward
    order = torch.argsort(k)
    assert (ab[:, order].diff(dim=1) <= 1e-15).all()                                 # higher |k| erased first
    beta = -torch.func.jacfwd(lambda u: torch.log(proc.alpha_bar(u)))(t).diagonal(dim1=0, dim2=2).T
    assert (beta >= 0).all()                                                         # β_k ≥ 0: a forward process
    # the knob: spread 0 erases every component at once; as it grows the highest |k| goes first and the windows in
    # which the lowest and the highest |k| are being erased separate
    grid = torch.linspace(0, 1, 401, dtype=torch.float64)
    low, high = k == k.min(), k == k.max()
    half, overlap = [], []
    for spread in (0.0, 4.0, 16.0, 64.0):
        a = make("matched-rg", DATA, spread=spread).alpha_bar(grid)
        active = ((a > 0.05) & (a < 0.95)).double()
        half.append(float(grid[(a[:, high][:, 0] < 0.5).nonzero()[0]]))
        overlap.append(float((active[:, low].mean(1) * active[:, high].mean(1)).sum()))
    assert half == sorted(half, reverse=True) and half[0] == pytest.approx(0.4975) and half[-1] < 0.05
    assert overlap == sorted(overlap, reverse=True) and overlap[-1] == 0


@pytest.mark.parametrize("name,options", PROCESSES + SHELL_PROCESSES, ids=IDS + SHELL_IDS)
def test_marginal_variances_match_closed_form_and_monte_carlo(name, options):
    proc = make(name, DATA, **options)
    t = torch.tensor([0.25, 0.6], dtype=torch.float64)
    m, v = proc.marginal(t)
    if proc.variance_preserving:                                                     # eq. 2 with the schedule's ᾱ
        ab = proc.alpha_bar(t)
        assert torch.equal(m, ab.sqrt()) and torch.allclose(v, proc.colour * (1 - ab), rtol=1e-15)
    n = 20_000
    x0 = DATA.images[:1].double().expand(n, *SHAPE)
    c0 = proc.basis.forward(DATA.images[:1].double())[0]
    for i, ti in enumerate(t.tolist()):
        c = proc.basis.forward(proc.noise(x0, ti, generator=torch.Generator().manual_seed(i)))
        mean, var = c.mean(0), c.var(0)
        sd = v[i].sqrt()
        assert ((mean - m[i] * c0).abs() <= 5 * sd / math.sqrt(n) + 1e-12).all()
        assert ((var - v[i]).abs() <= 5 * v[i] * math.sqrt(2 / n) + 1e-15).all()


@pytest.mark.parametrize("name,options", [("matched-rg", {}), ("component", {"basis": "pca", "schedule": "rg-cutoff",
                                                                             "colour": "matched"})])
def test_closed_form_marginal_solves_the_component_sde(name, options):
    """Euler–Maruyama on dc = −½β_k c dt + √β_k S_k dw (β_k = −d log ᾱ_k/dt by autograd) reaches the closed form."""
    proc = make(name, DATA, **options)
    n, steps, t_end = 3000, 200, 0.6
    g = torch.Generator().manual_seed(0)
    c0 = proc.basis.forward(DATA.images[:1].double())[0]
    c = c0.expand(n, -1).clone()
    ts = torch.linspace(0, t_end, steps + 1, dtype=torch.float64)
    for i in range(steps):
        mid = 0.5 * (ts[i] + ts[i + 1])
        a, g2 = proc.drift_coefficients(mid.reshape(1))
        dt = float(ts[i + 1] - ts[i])
        c = c + a[0] * c * dt + (g2[0] * dt).sqrt() * torch.randn(c.shape, generator=g, dtype=torch.float64)
    m, v = proc.marginal(t_end)
    assert ((c.mean(0) - m * c0).abs() <= 5 * v.sqrt() / math.sqrt(n) + 2e-3 * c0.abs()).all()
    assert ((c.var(0) / v - 1).abs() <= 5 * math.sqrt(2 / n) + 0.01).all()
    _, g2 = proc.drift_coefficients(torch.tensor([0.3], dtype=torch.float64))
    a, _ = proc.drift_coefficients(torch.tensor([0.3], dtype=torch.float64))
    assert torch.allclose(g2[0] / (-2 * a[0]), proc.colour, rtol=1e-8)              # S² = g²/β: the colour


# ---- scale by scale: the knob's two ends, and the wavelet cascade (Guth et al.) -----------------------------

def _per_shell(alpha_bar, shells):
    """ᾱ per shell [T, S] of ᾱ_k [T, D], checking that it is one value per shell."""
    out = []
    for s in range(int(shells.max()) + 1):
        block = alpha_bar[:, shells == s]
        assert torch.equal(block.max(1).values, block.min(1).values)                 # one schedule per shell
        out.append(block[:, 0])
    return torch.stack(out, 1)


def test_scale_by_scale_knob_runs_from_standard_diffusion_to_autoregressive():
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    # spread 0: the equal schedule bit for bit, hence the standard process
    zero, equal = make("scale-by-scale", DATA, spread=0.0), make("component", DATA, basis="fourier")
    assert torch.equal(zero.alpha_bar(grid), equal.alpha_bar(grid)) and zero.is_standard
    x0 = DATA.images[:4]
    assert torch.equal(zero.noise(x0, 0.4, generator=torch.Generator().manual_seed(1)),
                       equal.noise(x0, 0.4, generator=torch.Generator().manual_seed(1)))
    end = zero.schedule.base_alpha_bar(torch.ones(1, dtype=torch.float64))
    most_partial, tol = [], 1e-6
    for spread in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        proc = make("matched-scale-by-scale", DATA, spread=spread)
        ab = _per_shell(proc.alpha_bar(grid), proc.basis.shells)                      # [T, S], shell 0 = k = 0
        S = ab.shape[1]
        assert torch.equal(ab[0], torch.ones(S, dtype=torch.float64)) and torch.equal(ab[-1], end.expand(S))
        assert (ab.diff(dim=0) <= 0).all()                                            # β_k ≥ 0 everywhere
        partial = ((ab > tol) & (ab < 1 - tol)).sum(1)                                # shells being noised at t
        most_partial.append(int(partial.max()))
        half = torch.stack([grid[(ab[:, s] < 0.5).nonzero()[0, 0]] for s in range(S)])
        if spread > 0:
            assert (half.diff() < 0).all()                                            # higher |k| shells first
        # the probability-flow start: every component at or below the toolkit's σ_VE = 80 point
        ab_start = 1 / (1 + 80.0**2)
        at_start = proc.alpha_bar(torch.tensor([proc.ode_t_start()], dtype=torch.float64))
        assert float(at_start.max()) == pytest.approx(ab_start, rel=1e-6)
    assert most_partial == sorted(most_partial, reverse=True)
    assert most_partial[0] == S and most_partial[-1] == 1                            # all at once … one at a time
    # the autoregressive end: a shell starts only when the next finer one is done (at the base schedule's end)
    ab = _per_shell(make("scale-by-scale", DATA, spread=1.0).alpha_bar(grid), zero.basis.shells)
    for s in range(S - 1):
        started = (ab[:, s] < 1).nonzero()[0, 0]
        assert float(ab[started, s + 1]) <= float(end) * (1 + 1e-9)


def _haar_levels(H: int, J: int) -> torch.Tensor:
    """Level of each coefficient of the Mallat layout [H*H]: j = 1 … J details (1 finest), J + 1 the low-pass."""
    level = torch.full((H, H), J + 1)
    for j in range(J, 0, -1):
        h = H // 2 ** (j - 1)
        block = torch.zeros(H, H, dtype=torch.bool)
        block[:h, :h] = True
        block[: h // 2, : h // 2] = False
        level[block] = j
    return level.reshape(-1)


def test_wavelet_preset_is_the_wsgm_cascade_of_standard_diffusions_per_level():
    from scorefield.forward.bases import haar_analysis

    data, mu, cov = coloured_gaussian(300, (1, 8, 8), seed=3)
    proc = make("wavelet", data)
    assert proc.prediction == "x0" and make("wavelet", data, prediction="eps").prediction == "eps"
    assert make("scale-by-scale", data, spread=0.0).prediction == "eps"                # the standard process
    J, level = 3, _haar_levels(8, 3)
    x = data.images.double()
    c = haar_analysis(x[:, 0], J).reshape(len(x), -1)                                # [N, 64], Mallat layout
    power = (c**2).mean(0)
    S2 = torch.stack([power[level == j].mean() for j in range(1, J + 2)])           # per-level normalization
    assert torch.allclose(proc.colour, S2[level - 1], rtol=1e-12)
    cosine = get_schedule("cosine")
    t = torch.cat([torch.linspace(0, 1, 33, dtype=torch.float64), torch.tensor([0.1, 0.37, 0.6, 0.93])])
    ab = proc.alpha_bar(t)
    # the schedule factorizes by level: level j runs the cosine on its own window [(j−1)/(J+1), j/(J+1)]
    own_time = ((t[:, None] - (level[None, :] - 1) / (J + 1)) * (J + 1)).clamp(0, 1)
    assert torch.allclose(ab, cosine.alpha_bar(own_time).clamp(0, 1), rtol=1e-12, atol=0)
    # each level's normalized coefficients follow the standard VP diffusion at the level's own time
    g = torch.Generator().manual_seed(0)
    x0 = x[:6]
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for i, ti in enumerate(t.tolist()):
        xt = proc.noise_with(x0, ti, eps)
        ct = haar_analysis(xt[:, 0], J).reshape(6, -1) / S2[level - 1].sqrt()
        a = ab[i]
        want = a.sqrt() * c[:6] / S2[level - 1].sqrt() + (1 - a).sqrt() * haar_analysis(eps[:, 0], J).reshape(6, -1)
        assert (ct - want).abs().max() < 1e-12
    # inside level j's window the coarser levels are exactly clean and the finer ones pure noise, so the posterior
    # mean of levels ≥ j ignores the finer levels (the conditional p(x̄_j | x_j) of the cascade)
    den = GaussianProcessDenoiser(proc, mu, cov)
    basis = proc.basis
    for j in range(1, J + 2):
        tj = (j - 0.5) / (J + 1)
        abj = proc.alpha_bar(torch.tensor([tj], dtype=torch.float64))[0]
        end = cosine.alpha_bar(torch.tensor(1.0, dtype=torch.float64))
        assert (abj[level > j] == 1).all() and (abj[level < j] == end).all()
        xt = proc.noise(x0, tj, generator=g)
        other = basis.forward(xt)
        other[:, level < j] = torch.randn(6, int((level < j).sum()), generator=g, dtype=torch.float64)
        a, b = basis.forward(den(xt, tj)), basis.forward(den(basis.inverse(other), tj))
        keep = level >= j
        assert (a[:, keep] - b[:, keep]).abs().max() < 1e-8
        if j <= J:                                                                    # the low-pass as given
            assert (a[:, level > j] - basis.forward(xt)[:, level > j]).abs().max() < 1e-8


def test_eps_target_drops_only_the_noise_that_x_t_does_not_contain():
    from scorefield.forward.training import _drop_absent_noise

    proc = make("wavelet", DATA, prediction="eps")
    eps = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)                           # level 1, 2, low-pass windows
    target = proc.eps_target(eps)
    kept = proc.basis.forward(_drop_absent_noise(proc, target, t))
    _, v = proc.marginal(t)
    assert kept[v == 0].abs().max() < 1e-15
    assert torch.allclose(kept[v > 0], proc.basis.forward(target)[v > 0], atol=1e-12)
    assert int((v == 0).sum()) == 4 + 1                                               # clean: levels 2 + 3, then 3
    standard = make("standard", DATA)                                                 # every component noised
    assert _drop_absent_noise(standard, eps, t) is eps


# ---- the Gaussian score is exact under every process -------------------------------------------------------

@pytest.mark.parametrize("name,options", PROCESSES, ids=IDS)
def test_gaussian_score_of_coloured_gaussian_data_is_exact(name, options):
    proc = make(name, DATA, **options)
    den = GaussianProcessDenoiser(proc, MU, COV)
    Q = proc.basis.matrix
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (0.05, 0.3, 0.7, 0.95):
        m, v = proc.marginal(t)
        A, N = Q.T @ torch.diag(m) @ Q, Q.T @ torch.diag(v) @ Q                      # dense, pixel space
        cov_t = A @ COV @ A.T + N
        p_t = torch.distributions.MultivariateNormal(A @ MU, covariance_matrix=0.5 * (cov_t + cov_t.T))
        xx = x.reshape(5, -1).clone().requires_grad_(True)
        (truth,) = torch.autograd.grad(p_t.log_prob(xx).sum(), xx)
        score = den.score(x, t).reshape(5, -1)
        assert (score - truth).abs().max() <= 1e-7 * truth.abs().max()


def test_gaussian_denoiser_under_the_standard_process_is_the_toolkits():
    proc = make("standard", DATA)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sf.forward.gaussian_denoiser(proc, DATA)
    theirs = sf.models.make("gaussian", DATA)
    for t in (0.1, 0.5, 0.9):
        ab = proc.schedule.base_alpha_bar(torch.tensor([t], dtype=torch.float64))
        assert torch.allclose(ours(x, t), theirs(x, ab.expand(4)), atol=1e-10)


def test_free_theory_is_the_process_fixed_point_and_its_score_part_is_exact():
    """Matched colour ends at N(0, diag⟨|c_k|²⟩) and keeps it (the free theory is stationary); for stationary data
    in the Fourier basis the diagonal Gaussian is the full one; with NN ≡ 0 the free-theory parametrization is
    exactly the Gaussian denoiser (the network only learns the correction)."""
    H = 6
    fields, spectrum = sf.data.gaussian_random_field(3000, H, 2.0, generator=torch.Generator().manual_seed(0))
    data = sf.data.ImageSet((fields / 4).clamp(-1, 1))
    proc = make("matched-rg", data)
    power, colour = proc.statistics.power, proc.colour
    above = power > 1e-4 * power.mean()                                             # k = 0 is floored (zero mean)
    assert torch.equal(colour[above], power[above])                                 # S² = ⟨|c_k|²⟩
    m, v = proc.marginal(torch.linspace(0, 1, 6, dtype=torch.float64))
    assert torch.allclose(m**2 * colour + v, colour.expand_as(v), rtol=1e-12)       # N(0, S²) is kept at every t
    end = proc.prior(torch.randn(20000, 1, H, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert torch.allclose(proc.basis.forward(end).var(0), proc.colour, rtol=0.06)
    eye = torch.eye(H * H, dtype=torch.float64).reshape(-1, H, H)
    circulant = torch.fft.ifft2(torch.fft.fft2(eye) * (spectrum / 16 + 1e-3)).real.reshape(H * H, H * H)
    zero = torch.zeros(H * H, dtype=torch.float64)
    full = GaussianProcessDenoiser(proc, zero, circulant, covariance="full")
    diag = GaussianProcessDenoiser(proc, zero, circulant, covariance="diagonal")
    x = proc.noise(data.images[:4].double(), 0.4, generator=torch.Generator().manual_seed(2))   # typical x_t
    for t in (0.1, 0.4, 0.8):                          # stationary data: the free theory of the process is exact
        assert torch.allclose(full(x, t), diag(x, t), atol=1e-12)
    net = sf.models.make("convnet", data, preset="tiny", padding="circular")
    torch.nn.init.zeros_(net.out.weight)
    torch.nn.init.zeros_(net.out.bias)
    free = NetProcessDenoiser(net.double(), proc, prediction="eps", free_theory=True)
    exact = sf.forward.GaussianProcessDenoiser(proc, proc.basis.inverse(proc.statistics.mean[None]).reshape(-1),
                                               covariance="diagonal", variance=proc.statistics.variance)
    for t in (0.2, 0.6):
        assert torch.allclose(free(x, t), exact(x, t), atol=1e-10)
        assert torch.allclose(free.score(x, t), exact.score(x, t), rtol=1e-8, atol=1e-8)


# ---- presets are the published processes --------------------------------------------------------------------

def test_heat_dissipation_marginals_are_the_dct_blur():
    """Rissanen et al.: u_k = DCT⁻¹(exp(−(π²(p/N)² + π²(q/N)²)·σ_B,k²/2)·DCT(u₀)) + σ ε, σ_B log-spaced from
    0.5 to σ_max over K levels (level 0 the data)."""
    N, K = 8, 10
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, N, N, generator=g, dtype=torch.float64) * 2 - 1
    proc = make("heat-dissipation", x0, sigma_max=6.0)
    sigmas = np.exp(np.linspace(np.log(0.5), np.log(6.0), K))                       # their blur_schedule
    freqs = np.pi * np.linspace(0, N - 1, N) / N
    freq2 = freqs[:, None] ** 2 + freqs[None, :] ** 2                                # their frequencies_squared
    for level, sigma in enumerate(sigmas, start=1):
        t = (level - 1) / (K - 1) if level > 1 else 1e-300                          # level 1: t → 0⁺
        coef = scipy.fft.dctn(x0.numpy(), axes=(-2, -1), norm="ortho") * np.exp(-freq2 * sigma**2 / 2)
        blur = scipy.fft.idctn(coef, axes=(-2, -1), norm="ortho")
        assert np.abs(proc.mean(x0, t).numpy() - blur).max() < 1e-12
        _, v = proc.marginal(t)
        assert torch.equal(v, torch.full_like(v, 0.01**2))
    m0, v0 = proc.marginal(0.0)
    assert torch.equal(m0, torch.ones_like(m0)) and torch.equal(v0, torch.zeros_like(v0))    # level 0: the data
    assert proc.prediction == "x0" and proc.prior_kind == "gaussian"


def test_blurring_preset_is_hoogeboom_salimans():
    """get_frequency_scaling · get_noise_scaling_cosine of the paper's appendix, written out with numpy."""
    N = 8
    x0 = torch.rand(2, 1, N, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    proc = make("blurring", x0, sigma_blur_max=5.0)
    freqs = np.pi * np.linspace(0, N - 1, N) / N
    labda = freqs[:, None] ** 2 + freqs[None, :] ** 2
    lim_max = np.arctan(np.exp(-0.5 * 10))
    lim_min = np.arctan(np.exp(-0.5 * -10)) - lim_max
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        scaling = np.exp(-labda * (5.0 * np.sin(t * np.pi / 2) ** 2) ** 2 / 2) * (1 - 0.001) + 0.001
        logsnr = -2 * np.log(np.tan(lim_min * t + lim_max))
        a, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
        coef = scipy.fft.dctn(x0.numpy(), axes=(-2, -1), norm="ortho") * a * scaling
        assert np.abs(proc.mean(x0, t).numpy() - scipy.fft.idctn(coef, axes=(-2, -1), norm="ortho")).max() < 1e-12
        _, v = proc.marginal(t)
        assert torch.allclose(v, torch.full_like(v, sigma**2), rtol=1e-12)
    assert float(blurring_noise_scaling(torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(0.5)


# ---- the ideal denoiser -------------------------------------------------------------------------------------

def test_ideal_denoiser_is_the_ideal_score_machine_and_the_exact_posterior():
    data = sf.data.ImageSet(DATA.images[:30])
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    std = make("component", data, basis="fourier")
    machine = sf.models.make("is", data)
    for t in (0.3, 0.6):
        ab = std.schedule.base_alpha_bar(torch.tensor([t], dtype=torch.float64))
        ref = machine(x.float(), ab.float().expand(4)).double()
        assert (sf.forward.ideal_denoiser(std, data)(x, t) - ref).abs().max() < 1e-5
    proc = make("matched-rg", data)
    ideal = sf.forward.ideal_denoiser(proc, data)
    Q, train_x = proc.basis.matrix, data.images.reshape(30, -1).double()
    for t in (0.2, 0.7):
        m, v = proc.marginal(t)
        A, cov_t = Q.T @ torch.diag(m) @ Q, Q.T @ torch.diag(v) @ Q
        logp = torch.stack([torch.distributions.MultivariateNormal(A @ xi, covariance_matrix=cov_t).log_prob(
            x.reshape(4, -1)) for xi in train_x], dim=1)                              # [4, 30]
        expected = torch.softmax(logp, dim=1) @ train_x
        assert torch.allclose(ideal(x, t).reshape(4, -1), expected, atol=1e-9)


# ---- samplers reach the data under each process -------------------------------------------------------------

@pytest.mark.parametrize("name,options,sampler", [("matched-rg", {}, "ddim"), ("matched-rg", {"spread": 20.0}, "heun"),
                                                  ("heat-dissipation", {}, "ddim"), ("heat-dissipation", {}, "heun"),
                                                  ("blurring", {}, "euler"), ("wavelet", {}, "ddim"),
                                                  ("matched-scale-by-scale", {"spread": 0.5}, "euler")])
def test_exact_gaussian_denoiser_samples_the_gaussian(name, options, sampler):
    proc = make(name, DATA, **options)
    proc.statistics = DataStatistics.of_gaussian(proc.basis, MU, COV)     # heat dissipation starts from N(μ, Σ)'s p_T
    den = GaussianProcessDenoiser(proc, MU, COV)
    noise = sf.sampling.initial_noise(2000, SHAPE, seed=0).double()
    x = sf.sampling.sample(den, noise, process=proc, steps=100, sampler=sampler).reshape(2000, -1)
    assert (x.mean(0) - MU).abs().max() < 5 * COV.diagonal().sqrt().max() / math.sqrt(2000)
    assert (torch.cov(x.T) - COV).abs().max() < 0.15 * COV.diagonal().max()      # 2000 samples: ≈ 0.1 is noise


# ---- training, sampling, CLI under a process ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["matched-rg", "heat-dissipation", "blurring"])
def test_training_under_a_process_records_it_and_samples(tmp_path, name):
    data = _small_set(24)
    proc = make(name, data)
    result = train(_tiny(data), data, run_dir=tmp_path / "run", steps=30, batch_size=8, lr=5e-3, progress=False,
                   process=proc, free_theory=True)
    losses = [m["loss"] for m in result.losses]
    assert np.isfinite(losses).all()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["training"]["process"]
    assert saved == {**proc.spec(), "free_theory": True}
    assert result.model.process_parametrization == {"prediction": proc.prediction, "free_theory": True}
    x = sf.sampling.sample(result.model, sf.sampling.initial_noise(4, (1, 8, 8)), process=proc, steps=6)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    rebuilt = sf.forward.from_spec(saved, data)
    assert rebuilt.spec() == {**proc.spec(), "free_theory": True}
    m1, v1 = rebuilt.marginal(0.4)
    m2, v2 = proc.marginal(0.4)
    assert torch.equal(m1, m2) and torch.equal(v1, v2)


def test_train_cli_with_a_process_and_load_run(tmp_path):
    code = cli.main(["train", "--data", "grf", "--data-opt", "n=32", "--data-opt", "size=8", "--arch", "convnet",
                     "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--process", "matched-rg",
                     "--process-opt", "spread=4", "--free-theory", "--out", str(tmp_path), "--name", "r",
                     "--no-progress", "--samples", "2", "--sample-steps", "3"])
    assert code == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())["training"]["process"]
    assert config["name"] == "matched-rg" and config["spread"] == 4 and config["free_theory"] is True
    proc, net = sf.forward.load_run(tmp_path / "r")
    assert proc.spec() == config and net.process_parametrization["free_theory"] is True
    assert (tmp_path / "r" / "samples.png").exists()
    # resuming through the CLI rebuilds the same process
    assert cli.main(["train", "--resume", str(tmp_path / "r"), "--steps", "6", "--no-progress"]) == 0


def test_load_command_checks_a_run_under_its_own_process(tmp_path, capsys):
    assert cli.main(["train", "--data", "grf", "--data-opt", "n=32", "--data-opt", "size=8", "--arch", "convnet",
                     "--preset", "tiny", "--steps", "3", "--batch-size", "8", "--process", "wavelet", "--out",
                     str(tmp_path), "--name", "w", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["load", str(tmp_path / "w"), "--n", "16"]) == 0
    out = capsys.readouterr().out
    assert "under process 'wavelet'" in out and "mse_free_theory" in out and "mse_noisy_input" not in out
    # the check noises with the process itself, at the base schedule's ᾱ for VP processes; the exact (ideal)
    # denoiser of the training set beats the free theory on training images, which beats the mean at low noise
    data = _small_set(64)
    proc = make("wavelet", data)
    rows = sf.forward.denoising_check(proc, sf.forward.ideal_denoiser(proc, data), data.images[:16])
    assert [r["alpha_bar"] for r in rows] == [0.05, 0.25, 0.5, 0.75, 0.95]
    assert all(r["mse"] <= r["mse_free_theory"] + 1e-6 for r in rows)
    assert rows[-1]["mse_free_theory"] < rows[-1]["mse_mean_image"]


def test_compare_processes_command_writes_the_table(tmp_path):
    code = cli.main(["compare-processes", "--datasets", "grf", "--processes", "standard,matched-rg,blurring",
                     "--n-train", "64", "--n-test", "64", "--n-samples", "64", "--steps", "3", "--preset", "tiny",
                     "--sample-steps", "4", "--out", str(tmp_path), "--name", "c", "--no-progress"])
    assert code == 0
    table = (tmp_path / "c" / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("dataset,process") and len(table) == 1 + 2 + 3
    assert (tmp_path / "c" / "grf-spectra.png").exists() and (tmp_path / "c" / "grf-samples.png").exists()
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert "grf/colour" in summary["knobs"] or "grf/schedule" in summary["knobs"] or summary["knobs"] == {}
    # finished pairs are kept on resume
    assert cli.main(["compare-processes", "--datasets", "grf", "--processes", "standard,matched-rg,blurring",
                     "--n-train", "64", "--n-test", "64", "--n-samples", "64", "--steps", "3", "--preset", "tiny",
                     "--sample-steps", "4", "--resume", str(tmp_path / "c"), "--no-progress"]) == 0


def test_compare_processes_with_seeds_reports_mean_and_standard_error_and_resumes_per_unit(tmp_path):
    from scorefield.experiments.process_comparison import compare_processes

    options = dict(datasets=["grf"], processes=["standard", "matched"], preset="tiny", steps=2, n_train=32,
                   n_test=32, n_samples=16, sample_steps=3, progress=False, figures=False)
    run = compare_processes(out=tmp_path, name="s", seeds=2, **options)
    summary = run.read_json("summary.json")
    per_seed = summary["seed_rows"]
    assert [(r["process"], r["seed"]) for r in per_seed] == [
        (p, s) for s in (0, 1) for p in ("training images", "free theory", "standard", "matched")]
    for row in summary["rows"]:
        values = [float(r["swd"]) for r in per_seed if r["process"] == row["process"]]
        assert row["seeds"] == 2 and row["swd"] == pytest.approx(np.mean(values))
        assert row["swd_se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
    assert "±" in run.file("comparison.md").read_text() and run.exists("comparison-seeds.csv")
    colour = [float(by["matched"]["swd"]) - float(by["standard"]["swd"]) for by in (
        {r["process"]: r for r in per_seed if r["seed"] == s} for s in (0, 1))]
    assert summary["knobs"]["grf/colour"]["swd"] == pytest.approx(np.mean(colour))
    assert summary["knobs_se"]["grf/colour"]["swd"] == pytest.approx(np.std(colour, ddof=1) / math.sqrt(2))
    # resuming with a third seed trains only the new (process, seed) units
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "results").iterdir()}
    compare_processes(resume=tmp_path / "s", seeds=3, **options)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "results").iterdir()}
    assert all(after[p] == t for p, t in done.items())
    assert sorted(p.name for p in set(after) - set(done)) == [
        "grf-matched-seed2.json", "grf-matched-seed2.npz", "grf-standard-seed2.json", "grf-standard-seed2.npz"]
    assert run.read_json("summary.json")["seeds"] == 3


def test_metrics_have_their_exact_values():
    from scorefield.experiments.process_comparison import power_spectrum_error, sliced_wasserstein, wasserstein_1d

    x = torch.randn(500, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    assert power_spectrum_error(x, x) == 0 and sliced_wasserstein(x, x) == 0
    assert power_spectrum_error(2 * x, x) == pytest.approx(math.log(4), rel=1e-9)   # power ×4 in every shell
    assert wasserstein_1d(torch.zeros(10), torch.full((7,), 3.0)) == pytest.approx(3.0)
    shifted = x + 0.5
    assert sliced_wasserstein(shifted, x, projections=4000) == pytest.approx(0.5, rel=0.05)   # √(E(θ·s)²) = ½


def test_refusals_name_the_closest_choice():
    with pytest.raises(ProcessError, match="matched-rg"):
        make("matched-gr", DATA)
    with pytest.raises(ProcessError, match="matched"):
        make("component", DATA, colour="matchd")
    with pytest.raises(ProcessError, match="data"):
        make("matched", image_shape=SHAPE)
    with pytest.raises(ValueError, match="spread"):
        make("component", DATA, schedule="equal", spread=3)
    with pytest.raises(ValueError, match=r"spread .*\[0, 1\]"):
        make("scale-by-scale", DATA, spread=1.5)
    with pytest.raises(ProcessError, match="shell colour needs the data"):
        make("wavelet", image_shape=SHAPE)
    with pytest.raises(ProcessError, match="standard VP"):
        sf.sampling.sample(sf.models.make("is", DATA), torch.randn(2, *SHAPE), process=make("matched", DATA))
    with pytest.raises(sf.sampling.SamplingError, match="guidance"):
        sf.sampling.sample(sf.models.make("gaussian", DATA), torch.randn(2, *SHAPE), process=make("matched", DATA),
                           guidance=2.0)
    with pytest.raises(ProcessError, match="free_theory"):
        train(_tiny(_small_set()), _small_set(), steps=1, free_theory=True, progress=False)


def test_compare_processes_on_phi4_measures_the_lattice_observables(tmp_path):
    from scorefield.experiments.process_comparison import compare_processes

    run = compare_processes(datasets=["phi4"], processes=["standard", "heat-dissipation"], preset="tiny", steps=3,
                            n_train=64, n_test=64, n_samples=32, sample_steps=4,
                            phi4_options={"size": 4, "mass2": -1.0, "coupling": 3.0, "z2_flip": True},
                            out=tmp_path, name="p", progress=False)
    rows = run.read_json("summary.json")["rows"]
    assert [r["process"] for r in rows] == ["training images", "free theory", "standard", "heat-dissipation"]
    for r in rows:
        assert all(np.isfinite(float(r[key])) for key in ("ps_error", "swd", "w1_M", "w1_absM", "w1_S", "G_error"))
    assert run.exists("phi4-observables.png") and run.exists("phi4-spectra.png")
    # every figure has its numbers beside it
    assert run.exists("phi4-observables.npz") and run.exists("phi4-spectra.npz") and run.exists("phi4-samples.npz")
    spectra = run.load_arrays("phi4-spectra")
    assert {"k", "held-out_data", "training_images", "free_theory", "standard", "heat-dissipation"} <= set(spectra)
