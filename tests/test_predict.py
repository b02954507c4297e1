"""Calibration, agreement and prediction (kamb-ganguli App. C.2, Tables 1–2) on exact answers."""
import numpy as np
import pytest
import torch

import scorefield as sf
import scorefield.experiments.prediction as pr
from scorefield.analysis import AgreementError, agreement
from scorefield.cli import main
from scorefield.experiments.calibration import choose_sizes
from scorefield.runs import RunDir

TRUTH = [3, 3, 5, 5, 7, 7]          # lowest noise first


@pytest.fixture(scope="module")
def digits():
    return sf.data.load("digits", subset=60, seed=0)


@pytest.fixture(scope="module")
def known_network(digits):
    return sf.models.make("bbels", digits, patch_size=TRUTH, padding="zeros")


# ---- agreement -----------------------------------------------------------------------------------------

def test_agreement_of_a_batch_with_itself_is_perfect():
    x = torch.randn(4, 2, 5, 6)
    s = agreement(x, x)
    one = torch.ones(4, dtype=torch.float64)
    assert torch.allclose(s["r2"], one, atol=1e-12) and torch.allclose(s["pearson"], one, atol=1e-12)


def test_a_constant_shift_separates_r2_from_pearson():
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    shift = 0.3
    s = agreement(x, x + shift)
    ss_tot = (x - x.mean((1, 2, 3), keepdim=True)).pow(2).sum((1, 2, 3))
    expected = 1 - 64 * shift**2 / ss_tot                      # r² = 1 − Σ shift² / Σ (x − x̄)²
    torch.testing.assert_close(s["r2"], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(s["pearson"], torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    flipped = agreement(x, -x)                                 # r² = 1 − 4Σx² / Σ(x − x̄)², Pearson −1
    torch.testing.assert_close(flipped["r2"], 1 - 4 * x.pow(2).sum((1, 2, 3)) / ss_tot, atol=1e-12, rtol=0)
    assert (flipped["pearson"] + 1).abs().max() < 1e-12


def test_agreement_refuses_bad_input_and_flags_undefined_scores():
    with pytest.raises(AgreementError, match="differ in shape"):
        agreement(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(AgreementError, match="NaN"):
        agreement(torch.full((1, 1, 2, 2), float("nan")), torch.zeros(1, 1, 2, 2))
    with pytest.raises(AgreementError, match=r"\[B, C, H, W\]"):
        agreement(torch.zeros(4, 4), torch.zeros(4, 4))
    s = agreement(torch.zeros(1, 1, 3, 3), torch.randn(1, 1, 3, 3))
    assert torch.isnan(s["r2"]).all() and torch.isnan(s["pearson"]).all()


# ---- calibration ---------------------------------------------------------------------------------------

def test_choose_sizes_takes_the_lower_median_and_fills_flat_steps_from_the_nearest():
    sizes = [3, 5, 7]
    cos = np.zeros((3, 3, 4))
    cos[0] = 0.5                                              # flat: every size equal -> undetermined
    cos[1, 2, :] = 1.0                                        # every sample prefers 7
    cos[2, 0, :2] = 1.0                                       # two prefer 3, two prefer 5: lower median 3
    cos[2, 1, 2:] = 1.0
    best, chosen, undetermined = choose_sizes(cos, sizes)
    assert chosen == [7, 7, 3] and undetermined == [0] and (best[0] == 0).all()


def test_calibration_recovers_a_known_schedule_indexed_by_query_time(digits, known_network, tmp_path):
    cal = sf.experiments.calibrate(known_network, digits, patch_sizes=[3, 5, 7], seeds=range(4), steps=6,
                                   out=tmp_path, progress=False)
    assert cal.patch_sizes == TRUTH                            # lowest noise first, no off-by-one
    assert cal.undetermined == [0]                             # the flat first step from pure noise
    # step i is the noise level the network was queried at: t_i = 1 − i/6
    np.testing.assert_allclose(cal.times, [1 - i / 6 for i in range(6)], atol=1e-12)
    truth = known_network.patch_size_at
    assert [cal.patch_schedule()(ab) for ab in cal.alpha_bars] == [truth(ab) for ab in cal.alpha_bars]
    again = sf.experiments.Calibration.load(cal.run_dir)
    assert again.patch_sizes == TRUTH and again.cosine.shape == (6, 3, 4)
    for name in ("schedule.csv", "schedule.md", "schedule.png", "calibration.npz"):
        assert (cal.run_dir / name).is_file()


def test_an_interrupted_calibration_resumes_without_redoing_finished_steps(digits, known_network, tmp_path,
                                                                        monkeypatch):
    import scorefield.experiments.calibration as cb

    real = cb.cosine_per_sample
    calls = {"n": 0}

    def dies(*a):
        calls["n"] += 1
        if calls["n"] == 7:                                   # during the third step (3 sizes per step)
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(cb, "cosine_per_sample", dies)
    with pytest.raises(KeyboardInterrupt):
        sf.experiments.calibrate(known_network, digits, patch_sizes=[3, 5, 7], seeds=range(2), steps=6,
                                 out=tmp_path, name="cut", progress=False)
    assert sorted(p.name for p in (tmp_path / "cut" / "steps").iterdir()) == ["step-000.npz", "step-001.npz"]
    calls["n"] = -100
    cal = sf.experiments.calibrate(known_network, digits, patch_sizes=[3, 5, 7], seeds=range(2), steps=6,
                                   resume=tmp_path / "cut", progress=False)
    assert calls["n"] == -100 + 4 * 3 and cal.patch_sizes == TRUTH


# ---- prediction ----------------------------------------------------------------------------------------

def test_a_machine_predicts_itself_perfectly_and_the_run_directory_is_complete(digits, known_network, tmp_path):
    res = sf.experiments.predict(known_network, digits, theories=["is", "ls", "bbels"], schedule_from=TRUTH,
                                 seeds=range(5), steps=6, out=tmp_path, progress=False)
    rows = {r["theory"]: r for r in res.table}
    assert rows["bbels"]["r2_median"] == pytest.approx(1.0, abs=1e-6)
    assert rows["bbels"]["pearson_median"] == pytest.approx(1.0, abs=1e-6)
    assert rows["ls"]["r2_median"] < 0.99 and rows["bbels"]["fraction_beats_is"] == 1.0
    assert len(res.per_sample) == 5 and {"bbels_r2", "is_pearson", "seed"} <= set(res.per_sample[0])
    for name in ("agreement.csv", "agreement.md", "per_sample.csv", "scatter.png", "grid-00.png", "summary.json",
                 "samples/network.npz", "samples/is.npz"):
        assert (res.run_dir / name).is_file()
    summary = RunDir.open(res.run_dir).read_json("summary.json")
    assert -1 <= summary["network_sample_min"] and summary["network_sample_max"] <= 1


def test_an_interrupted_prediction_resumes_and_keeps_finished_samples(digits, known_network, tmp_path, monkeypatch):
    real = pr.sample
    calls = {"n": 0}

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pr, "sample", dies_on_third)
    kw = dict(theories=["is", "bbels"], schedule_from=TRUTH, seeds=range(3), steps=6, progress=False)
    with pytest.raises(KeyboardInterrupt):
        sf.experiments.predict(known_network, digits, out=tmp_path, name="cut", **kw)
    kept = RunDir.open(tmp_path / "cut").load_arrays("samples/is.npz")["samples"]
    calls["n"] = -100
    res = sf.experiments.predict(known_network, digits, resume=tmp_path / "cut", **kw)
    assert calls["n"] == -99                                   # only bbELS was sampled again
    np.testing.assert_array_equal(res.samples["is"].numpy(), kept)


def test_prediction_refuses_a_patch_machine_without_a_schedule(digits, known_network, tmp_path):
    with pytest.raises(sf.models.ModelConfigError, match="schedule_from"):
        sf.experiments.predict(known_network, digits, theories=["ls"], seeds=range(2), steps=3, out=tmp_path)


def test_clip_x0_clips_the_estimate_the_sampler_uses():
    class Wild(sf.models.Denoiser):
        def denoise(self, x, ab, labels):
            return 50 * torch.ones_like(x)

    wild = Wild((1, 4, 4))
    noise = sf.sampling.initial_noise(2, (1, 4, 4))
    seen = []
    sf.sampling.sample(wild, noise, steps=3, clip_x0=True, callback=lambda i: seen.append(i["x0_hat"]))
    assert max(float(s.max()) for s in seen if s is not None) == 1.0
    out = sf.sampling.sample(wild, noise, steps=3, clip_x0=True)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


# ---- the command line ------------------------------------------------------------------------------------

def test_cli_calibrate_and_predict_run_end_to_end(tmp_path, capsys):
    common = ["--model", "bbels", "--patch", "3,3,5,5,7,7", "--model-padding", "zeros", "--data", "digits",
              "--subset", "40", "--steps", "6", "--out", str(tmp_path), "--no-progress"]
    assert main(["calibrate", *common, "--sizes", "3:7", "--seeds", "2", "--name", "cal"]) == 0
    assert "3,3,5,5,7,7" in capsys.readouterr().out
    assert main(["predict", *common, "--seeds", "3", "--schedule-from", str(tmp_path / "cal"), "--name", "p"]) == 0
    out = capsys.readouterr().out
    assert "| bbels | 3 | 1 | 1 | 1 |" in out and "run directory" in out
    assert main(["predict", *common, "--seeds", "2", "--cal-seeds", "2", "--sizes", "3,5,7", "--name", "q",
                 "--theories", "is,bbels"]) == 0
    assert (tmp_path / "q-calibration" / "schedule.png").is_file() and (tmp_path / "q" / "grid-00.png").is_file()
    assert RunDir.open(tmp_path / "q-calibration").config["seeds"] == [100_000, 100_001]     # held out
    assert main(["predict", "--model", "ls", "--data", "digits", "--pretrained", "x"]) == 2


# ---- the bundled network of the main job -------------------------------------------------------------------

def test_the_bundled_network_denoises_and_samples_in_range_only_with_clipping(one_thread):
    from scorefield import pretrained

    net = pretrained.load()
    assert net.config["name"] == "resnet" and net.config["padding"] == "zeros"
    digits = sf.data.load("mnist", split="test", subset=32, seed=0).images
    ab = torch.full((32,), 0.5)
    x = ab.sqrt()[:, None, None, None] * digits + (1 - ab).sqrt()[:, None, None, None] * torch.randn_like(digits)
    with torch.no_grad():
        mse = float((net(x, ab) - digits).pow(2).mean())
    assert mse < 0.08                                        # the mean image scores 0.26 (README)
    noise = sf.sampling.initial_noise(4, (1, 28, 28), seed=0)
    first = []
    out = sf.sampling.sample(net, noise, steps=20, callback=lambda i: first.append(i["x0_hat"]))
    assert float(first[0].abs().max()) > 2                   # ᾱ(t = 1) ≈ 0: ε̂'s error is multiplied by 1/√ᾱ
    clipped = sf.sampling.sample(net, noise, steps=20, clip_x0=True)
    assert clipped.abs().max() <= 1 + 1e-5 and out.abs().max() > clipped.abs().max()


def test_bad_calibration_input_is_refused_before_a_run_directory_exists(digits, known_network, tmp_path):
    with pytest.raises(sf.models.ModelConfigError, match="odd"):
        sf.experiments.calibrate(known_network, digits, patch_sizes=[3, 4], seeds=range(2), steps=3, out=tmp_path)
    with pytest.raises(sf.models.ModelConfigError, match="padding|bbels"):
        sf.experiments.calibrate(known_network, digits, padding="circular", machine="bbels", patch_sizes=[3],
                                 seeds=range(2), steps=3, out=tmp_path)
    with pytest.raises(sf.models.ModelConfigError, match="labels"):
        sf.experiments.calibrate(known_network, digits, patch_sizes=[3], seeds=range(2), labels=[1, 2, 3],
                                 steps=3, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_calibration_seeds_are_kept_out_of_the_predicted_seeds(digits, known_network, tmp_path, capsys):
    cal = sf.experiments.calibrate(known_network, digits, patch_sizes=[3, 5, 7], seeds=[1, 5], steps=6,
                                   out=tmp_path, progress=False)
    assert cal.seeds == [1, 5] and sf.experiments.Calibration.load(cal.run_dir).seeds == [1, 5]
    with pytest.warns(UserWarning, match="calibrated on 1 of the predicted seeds"):
        sf.experiments.predict(known_network, digits, theories=["is"], schedule_from=cal.run_dir, seeds=range(3),
                               steps=6, out=tmp_path, progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sf.experiments.predict(known_network, digits, theories=["is"], schedule_from=cal, seeds=[0, 2, 3],
                               steps=6, out=tmp_path, progress=False)
    common = ["--model", "ls", "--patch", "5", "--data", "digits", "--subset", "60", "--steps", "4", "--seeds", "3",
              "--theories", "is,ls", "--out", str(tmp_path), "--no-progress"]
    before = set(tmp_path.iterdir())
    assert main(["predict", *common, "--cal-seed-start", "2"]) == 2
    assert "--cal-seed-start 2 would calibrate on predicted seeds (0..2)" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before                  # refused before any run directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_that_is_not_there_is_refused_before_a_run_directory_exists(digits, known_network, tmp_path,
                                                                             capsys):
    from scorefield.experiments.networks import run_device

    assert run_device(known_network, None) == torch.device("cpu")          # a machine: no parameters
    net = sf.models.make("resnet", digits, preset="tiny")
    assert run_device(net, None) == torch.device("cpu") and run_device(net, "cpu") == torch.device("cpu")
    with pytest.raises(sf.models.ModelConfigError, match="no CUDA device"):
        sf.experiments.calibrate(known_network, digits, patch_sizes=[3, 5], seeds=range(2), steps=3, out=tmp_path,
                                 device="cuda")
    with pytest.raises(sf.models.ModelConfigError, match="no CUDA device"):
        sf.experiments.predict(known_network, digits, theories=["is"], seeds=range(2), steps=3, out=tmp_path,
                               device="cuda")
    assert list(tmp_path.iterdir()) == []
    assert main(["predict", "--model", "ls", "--patch", "5", "--data", "digits", "--subset", "20", "--steps", "3",
                 "--seeds", "2", "--theories", "is", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_the_network_can_take_its_own_step_count_from_the_same_noise(digits, tmp_path, capsys):
    """kamb-ganguli App. B: the CNN sampled with 150 steps against 20-step theories; here 9 against 4."""
    net = sf.models.make("ls", digits, patch_size=5, padding="zeros")
    res = sf.experiments.predict(net, digits, theories=["ls"], schedule_from=[5] * 4, seeds=range(3), steps=4,
                                 network_steps=9, out=tmp_path, progress=False)
    noise = sf.sampling.initial_noise(3, (1, 8, 8), seeds=[0, 1, 2])
    fine = sf.sampling.sample(net, noise, steps=9, clip_x0=True)
    coarse = sf.sampling.sample(net, noise, steps=4, clip_x0=True)
    torch.testing.assert_close(res.samples["network"], fine)
    torch.testing.assert_close(res.samples["ls"], coarse)
    assert (res.samples["network"] - res.samples["ls"]).abs().max() > 1e-3      # the step counts differ
    assert RunDir.open(res.run_dir).config["network_steps"] == 9
    with pytest.raises(sf.models.ModelConfigError, match="network_steps"):
        sf.experiments.predict(net, digits, theories=["ls"], schedule_from=[5] * 4, seeds=range(2), steps=4,
                               network_steps=0, out=tmp_path, progress=False)
    common = ["--model", "ls", "--patch", "5", "--data", "digits", "--subset", "60", "--steps", "4", "--seeds", "2",
              "--theories", "ls", "--patch-sizes", "5,5,5,5", "--out", str(tmp_path), "--no-progress"]
    assert main(["predict", *common, "--network-steps", "0"]) == 2
    assert "--network-steps must be at least 1" in capsys.readouterr().err
    assert main(["predict", *common, "--network-steps", "9", "--name", "n9"]) == 0
    assert RunDir.open(tmp_path / "n9").config["network_steps"] == 9
