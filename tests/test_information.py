"""Information spreading (EFT paper eq. 4–6, 8, 10): streamed moments, ρ / I against separation, collapse, snapping."""
import math

import numpy as np
import pytest
import torch

import scorefield as sf
from scorefield.analysis import information as info
from scorefield.data.synthetic import gaussian_random_field
from scorefield.models.machines import TanhMachine

pytestmark = pytest.mark.usefixtures("one_thread")


def _tanh(size=16, channels=1, patch=3, padding="circular"):
    h, w = (size, size) if isinstance(size, int) else size
    return TanhMachine(channels, (h, w), patch, padding)


# ---- exact answers -------------------------------------------------------------------------------------------

def _grf(n=2000, size=32, exponent=3.0, seed=0):
    fields, spectrum = gaussian_random_field(n, size, exponent, generator=torch.Generator().manual_seed(seed))
    exact = torch.fft.ifft2(spectrum).real.numpy()           # C(δ) = (1/HW) Σ_k P(k) e^{ik·δ}; C(0) = mean P = 1
    return fields.double(), exact


def test_translation_estimator_recovers_the_exact_grf_correlation():
    fields, exact = _grf()
    res = info.two_point(info.moments_from_samples(fields), bootstrap=200, seed=1)
    sep, rho_exact = info.radial_average(exact)
    np.testing.assert_allclose(res.separation, sep)
    assert res.separation[0] == 1.0                            # distance 0 (ρ = 1) is excluded
    assert res.rho.shape == res.rho_err.shape == (1, len(sep))
    check = [0, 1, 2, 3, 4, 5, np.flatnonzero(sep == 5.0)[0], np.flatnonzero(sep == 8.0)[0]]
    err = res.rho_err[0, check]
    assert np.all(err > 0) and np.all(err < 0.01)
    z = (res.rho[0, check] - rho_exact[check]) / err
    assert np.all(np.abs(z) < 3), z
    # eq. 5 of the estimated ρ, pair by pair: at distance 1 every displacement has the same |δ| and nearly equal ρ
    assert res.mi[0, 0] == pytest.approx(-0.5 * math.log(1 - res.rho[0, 0] ** 2), rel=1e-3)
    # eq. 4 is the connected function: a fixed non-uniform mean field added to every sample changes nothing
    pattern = 3 * torch.sin(torch.arange(32.0, dtype=torch.float64) / 3)[:, None] * torch.ones(32, dtype=torch.float64)
    shifted = info.two_point(info.moments_from_samples(fields + pattern), bootstrap=0)
    np.testing.assert_allclose(shifted.rho, res.rho, rtol=0, atol=1e-9)


def test_anchor_estimator_recovers_the_exact_grf_correlation():
    fields, exact = _grf()
    anchors = [(16, 16), (4, 4)]
    res = info.two_point(info.moments_from_samples(fields, anchors=anchors), anchors=anchors, bootstrap=200)
    # exact: ρ(a, p) = C(p − a), binned by the plain Euclidean distance from each anchor, then over anchors
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    per_anchor = []
    for ay, ax in anchors:
        d2 = (yy - ay) ** 2 + (xx - ax) ** 2
        c = exact[(yy - ay) % 32, (xx - ax) % 32]
        per_anchor.append({int(v): c[d2 == v].mean() for v in np.unique(d2) if v > 0})
    for r_index in range(6):
        d2 = int(round(res.separation[r_index] ** 2))
        want = np.mean([p[d2] for p in per_anchor if d2 in p])
        assert abs(res.rho[0, r_index] - want) < 3 * res.rho_err[0, r_index], (r_index, res.rho[0, r_index], want)
    # eq. 6 normalizes each pair by its own variances: a fixed pixel-dependent scale leaves anchor ρ unchanged
    scale = 1 + torch.rand(32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scaled = info.two_point(info.moments_from_samples(fields * scale, anchors=anchors), anchors=anchors,
                            bootstrap=0)
    np.testing.assert_allclose(scaled.rho, res.rho, rtol=0, atol=1e-9)


def test_heat_equation_from_white_noise_collapses_on_r2_over_alpha_bar():
    """The diffusive regime (eq. 9, App. A.3): u = e^{τ∇²} ξ with τ ∝ ᾱ has ρ = ρ(r²/ᾱ); its curves collapse on
    |x−y|²/ᾱ and not on |x−y|, through the whole pipeline (moments → ρ → collapse)."""
    ab = np.array([0.05, 0.1, 0.2, 0.4])
    xi = torch.randn(400, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = 2 * math.pi * torch.fft.fftfreq(32, dtype=torch.float64)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    fields = torch.stack([torch.fft.ifft2(torch.fft.fft2(xi) * torch.exp(-k2 * 20 * a)).real for a in ab])
    res = info.two_point(info.moments_from_samples(fields, t=1 - ab, alpha_bar=ab), bootstrap=0)
    assert np.isnan(res.rho_err).all()                         # no bootstrap, no error bars
    for quantity in ("rho", "mi"):
        scaled, plain = info.collapse(res, "r2_over_alpha_bar", quantity), info.collapse(res, "r", quantity)
        assert scaled < 0.01 and plain > 0.1, (quantity, scaled, plain)


# ---- streaming -----------------------------------------------------------------------------------------------

def _direct_moments(x, anchors, blocks):
    """Block sums from the whole stored ensemble x [T, N, C, H, W], by definition (no FFT, no streaming)."""
    n_times, n, c, h, w = x.shape
    block = np.arange(n) * min(blocks, n) // n
    k = block.max() + 1
    out = {name: np.zeros((k, n_times, c, h, w)) for name in ("sum_x", "sum_xx", "sum_auto")}
    out["sum_anchor"] = np.zeros((k, n_times, len(anchors), c, h, w))
    for b in range(k):
        xb = x[:, block == b]                                                    # [T, n_b, C, H, W]
        out["sum_x"][b] = xb.sum(1)
        out["sum_xx"][b] = (xb * xb).sum(1)
        for dy in range(h):
            for dx in range(w):
                shifted = torch.roll(xb, shifts=(-dy, -dx), dims=(-2, -1))        # shifted[p] = x[p + δ]
                out["sum_auto"][b][:, :, dy, dx] = (xb * shifted).sum((1, 3, 4))
        for a, (ay, ax) in enumerate(anchors):
            out["sum_anchor"][b][:, a] = (xb[..., ay:ay + 1, ax:ax + 1] * xb).sum(1)
    return out


def test_streamed_moments_equal_the_stored_ensemble_and_ignore_batch_size():
    model = _tanh((6, 8), channels=2)
    noise = sf.sampling.initial_noise(23, (2, 6, 8), seed=3).double()
    anchors = [(3, 4), (0, 7)]
    opts = dict(times=[1.0, 0.5, 0.25, 0.0], steps=4, anchors=anchors, blocks=5, progress=False)
    small = info.record(model, noise, batch_size=4, **opts)
    large = info.record(model, noise, batch_size=64, **opts)
    states = info.record_states(model, noise, times=opts["times"], steps=4, batch_size=7)
    direct = _direct_moments(states.x, anchors, blocks=5)
    from_samples = info.moments_from_samples(states.x, anchors=anchors, blocks=5, batch_size=6)
    assert small.n == 23 and small.blocks == 5 and small.block_n.tolist() == [5, 5, 4, 5, 4]
    for name, want in direct.items():
        for traj in (small, large, from_samples):
            np.testing.assert_allclose(getattr(traj, name), want, rtol=0, atol=1e-10 * max(1, np.abs(want).max()))
    np.testing.assert_array_equal(small.steps, [0, 2, 3, 4])
    np.testing.assert_allclose(small.t, states.t)
    res_small, res_large = info.two_point(small), info.two_point(large)
    np.testing.assert_allclose(res_small.rho, res_large.rho, atol=1e-12)
    np.testing.assert_allclose(res_small.rho_err, res_large.rho_err, atol=1e-12)


def test_record_tanh_machine_noise_is_uncorrelated_and_samples_are_not(tmp_path):
    data = sf.data.load("two-image", size=16)
    model = sf.models.make("tanh", data, patch_size=3, padding="circular")
    noise = sf.sampling.initial_noise(64, (1, 16, 16), seed=0)
    traj = info.record(model, noise, times=[1.0, 0.52, 0.26, 0.0], steps=8, progress=False)
    np.testing.assert_allclose(traj.t, [1.0, 0.5, 0.25, 0.0])          # nearest grid times, reported
    sched = sf.schedules.get_schedule("cosine")
    np.testing.assert_allclose(traj.alpha_bar, sched.alpha_bar(torch.tensor(traj.t)).numpy(), rtol=1e-12)
    for name in ("sum_x", "sum_xx", "sum_auto", "sum_anchor"):
        assert np.isfinite(getattr(traj, name)).all()
    res = info.two_point(traj, bootstrap=100)
    assert abs(res.rho[0, 0]) < max(0.05, 4 * res.rho_err[0, 0])       # pure noise: uncorrelated pixels
    assert np.all((res.rho[2:, 0] > 0.2) & (res.rho[2:, 0] <= 1))     # late times: neighbours correlate
    assert res.rho[-1, 0] > res.rho[1, 0] > res.rho[0, 0]              # information grows along the process
    assert np.all(res.mi[2:, 0] > 0)
    anchored = info.two_point(traj, anchors="recorded", bootstrap=0)
    assert anchored.method == "anchors" and anchored.rho[-1, 0] > 0.2
    loaded = info.Trajectory.load(traj.save(tmp_path / "traj.npz"))
    np.testing.assert_array_equal(info.two_point(loaded, bootstrap=0).rho, info.two_point(traj, bootstrap=0).rho)
    assert loaded.meta["sampler"] == "ddim" and loaded.image_shape == (1, 16, 16)
    merged = traj.merge(loaded)
    assert merged.n == 128 and merged.blocks == 40
    np.testing.assert_allclose(info.two_point(merged, bootstrap=0).rho, info.two_point(traj, bootstrap=0).rho,
                               atol=1e-12)


def test_perfectly_correlated_pixels_give_finite_information():
    z = torch.randn(50, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj = info.moments_from_samples(z.expand(50, 1, 8, 8))           # every pixel of a sample equal: ρ = 1
    for anchors in (None, "recorded"):
        res = info.two_point(traj, anchors=anchors, bootstrap=20)
        assert np.isfinite(res.rho).all() and np.isfinite(res.mi).all() and np.isfinite(res.mi_err).all()
        np.testing.assert_allclose(res.rho, 1.0, atol=1e-12)
        assert res.mi.max() == pytest.approx(-0.5 * math.log(1 - info.RHO2_MAX), rel=1e-3)
    assert info.gaussian_information(np.array([1.0 + 1e-15]))[1].all()  # the clip is reported


# ---- collapse ----------------------------------------------------------------------------------------------------

def _curves(rho, alpha_bar):
    sep = np.sqrt(np.unique(info.periodic_d2(32, 32))[1:])
    values = rho(sep[None, :], alpha_bar[:, None])
    return info.TwoPoint(sep, values, info.gaussian_information(values)[0], 1 - alpha_bar, alpha_bar)


def test_collapse_separates_self_similar_from_frozen_curves():
    ab = np.array([0.05, 0.1, 0.2, 0.4])
    diffusive = _curves(lambda r, a: np.exp(-r**2 / (20 * a)), ab)
    frozen = _curves(lambda r, a: np.exp(-r**2 / 4.0) + 0 * a, ab)
    for quantity in ("rho", "mi"):
        assert info.collapse(diffusive, "r2_over_alpha_bar", quantity) < 0.01
        assert info.collapse(diffusive, "r", quantity) > 0.1
        assert info.collapse(frozen, "r", quantity) < 1e-12
        assert info.collapse(frozen, "r2_over_alpha_bar", quantity) > 0.1
    with pytest.raises(ValueError, match="share no range"):
        info.collapse_score([np.array([1.0, 2.0]), np.array([3.0, 4.0])], [np.zeros(2), np.ones(2)])


def test_collapse_by_time_finds_where_the_diffusive_regime_ends():
    ab = np.array([0.02, 0.04, 0.08, 0.16, 0.3, 0.5, 0.7, 0.9])
    # diffusive up to ᾱ = 0.16, frozen afterwards
    res = _curves(lambda r, a: np.exp(-r**2 / (20 * np.minimum(a, 0.16))), ab)
    profile = info.collapse_by_time(res, "r2_over_alpha_bar", window=2)
    assert profile.score.shape == (7,)
    assert np.all(profile.score[:3] < 0.003) and np.all(profile.score[3:] > 0.02)   # ᾱ ratios shrink later
    assert profile.holds_until(0.01) == pytest.approx(0.16)
    np.testing.assert_allclose(profile.alpha_bar_lo, ab[:-1])
    assert math.isnan(info.collapse_by_time(res, "r", window=2).holds_until(0.01))


# ---- snapping (eq. 8) --------------------------------------------------------------------------------------------

def test_snapping_late_ddim_states_follow_the_probability_flow_relaxation_not_eq8_as_printed():
    data = sf.data.load("two-image", size=8)
    model = sf.models.make("els", data, patch_size=3, padding="circular")
    noise = sf.sampling.initial_noise(8, (1, 8, 8), seed=0).double()
    states = info.record_states(model, noise, times=[0.15, 0.1, 0.05], steps=20)
    target = info.nearest_patch_centres(model, states.x[0], states.alpha_bar[0], data)
    assert set(target.unique().tolist()) <= {-1.0, 1.0}               # centres of the ±1 bank patches
    snapped = (model(states.x[0].float(), float(states.alpha_bar[0])).double() - target).abs() < 1e-6
    assert snapped.double().mean() > 0.8
    flow = info.snapping(states, target)                              # default: the probability-flow form
    assert flow.form == "probability_flow"
    assert flow.deviation.shape == states.x.shape
    assert flow.deviation[:, snapped].abs().max() < 1e-4             # exact where x̂₀ has snapped to φ*(0)
    literal = info.snapping(states, target, form="eq8")
    assert literal.deviation[-1].abs().median() > 0.5                 # eq. 8 as printed moves away from φ*
    assert literal.rms_deviation[-1] > 100 * flow.deviation[-1, snapped].abs().max()
    with pytest.raises(ValueError, match="ᾱ = 1"):
        info.snapping(torch.cat([states.x, states.x[-1:]]), target, alpha_bar=[*states.alpha_bar, 1.0], form="eq8")


# ---- figure and bad input ----------------------------------------------------------------------------------------

def test_information_figure_has_two_labelled_panels_and_a_colour_bar(tmp_path):
    res = _curves(lambda r, a: np.exp(-r**2 / (20 * a)), np.array([0.05, 0.1, 0.2, 0.4]))
    fig = info.information_figure(res)
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xscale() for ax in panels[:2]] == ["linear", "log"]
    assert "pixels" in panels[0].get_xlabel() and "ᾱ" in panels[1].get_xlabel()
    assert any("ᾱ" in ax.get_ylabel() for ax in fig.axes if ax not in panels[:2])   # the colour bar
    assert "collapse number" in fig.get_suptitle()
    fig.savefig(tmp_path / "information.png")
    assert (tmp_path / "information.png").stat().st_size > 10_000


def test_bad_input_names_the_argument():
    model = _tanh(8)
    noise = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="noise"):
        info.record(model, noise[:, 0], steps=2, progress=False)
    with pytest.raises(ValueError, match="noise"):
        info.record(model, torch.randn(4, 3, 8, 8), steps=2, progress=False)     # 3 channels, model has 1
    with pytest.raises(ValueError, match="noise"):
        info.record(model, noise[:1], steps=2, progress=False)                  # one sample has no ensemble
    with pytest.raises(ValueError, match="times"):
        info.record(model, noise, times=[], steps=2, progress=False)
    with pytest.raises(ValueError, match="times"):
        info.record(model, noise, times=[0.5, 1.5], steps=2, progress=False)
    with pytest.raises(ValueError, match="anchors"):
        info.record(model, noise, anchors=[(8, 0)], steps=2, progress=False)
    traj = info.record(model, noise, anchors=[(1, 1)], steps=2, progress=False)
    with pytest.raises(ValueError, match="anchors"):
        info.two_point(traj, anchors=[(2, 2)])
    with pytest.raises(ValueError, match="variable"):
        info.collapse(info.two_point(traj, bootstrap=0), variable="r_squared")
