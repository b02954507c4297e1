import numpy as np
import pytest

import scorefield.experiments.sample_run as sr
from scorefield.cli import main
from scorefield.runs import RunDir


def cfg(**kw):
    base = dict(model="gaussian", data="digits", data_options={"subset": 40}, n=5, steps=4, batch_size=2)
    base.update(kw)
    return sr.SampleConfig(**base)


def test_interrupted_run_resumes_and_loses_no_finished_batch(tmp_path, monkeypatch):
    reference = sr.run_sampling(cfg(), root=tmp_path, name="ref", progress=False)
    calls = {"n": 0}
    real_sample = sr.sample

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_sample(*a, **k)

    monkeypatch.setattr(sr, "sample", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sr.run_sampling(cfg(), root=tmp_path, name="cut", progress=False)
    cut = RunDir.open(tmp_path / "cut")
    first = cut.load_arrays("batches/batch-0000.npz")["samples"]
    assert not cut.exists("samples.npz")
    monkeypatch.setattr(sr, "sample", real_sample)
    sr.run_sampling(cfg(), resume=tmp_path / "cut", progress=False)
    assert np.array_equal(cut.load_arrays("batches/batch-0000.npz")["samples"], first)  # kept, not redone
    got, want = cut.load_arrays("samples")["samples"], reference.load_arrays("samples")["samples"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(cut.read_metrics()) == 3 and (cut.path / "memorization.csv").exists()


def test_cli_sample_writes_the_run_directory(tmp_path, capsys):
    code = main(["sample", "--model", "gaussian", "--data", "digits", "--subset", "30", "--n", "3", "--steps", "3",
                 "--out", str(tmp_path), "--name", "r"])
    assert code == 0
    run = RunDir.open(tmp_path / "r")
    for f in ("samples.npz", "samples.png", "nearest.png", "memorization.csv", "summary.json", "environment.json"):
        assert run.exists(f), f
    s = run.load_arrays("samples")
    assert s["samples"].shape == (3, 1, 8, 8) and s["nearest_index"].shape == (3,)
    assert "run directory" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["sample", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["sample", "--model", "gaussian", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_trajectories_are_saved_per_step(tmp_path):
    run = sr.run_sampling(cfg(n=2, steps=3, save_trajectory=True), root=tmp_path, name="traj", progress=False)
    batch = run.load_arrays("batches/batch-0000.npz")
    assert batch["trajectory_x"].shape == (2, 3, 1, 8, 8) and batch["trajectory_x0_hat"].shape == (2, 3, 1, 8, 8)
    np.testing.assert_allclose(batch["trajectory_x"][:, 0], batch["noise"], atol=0)   # step 0 is the noise


def test_a_device_is_used_or_refused_before_the_run_directory(tmp_path, capsys):
    import torch

    base = sr.run_sampling(cfg(), root=tmp_path, name="default", progress=False)
    on_cpu = sr.run_sampling(cfg(), root=tmp_path, name="cpu", progress=False, device="cpu")
    assert np.array_equal(base.load_arrays("samples")["samples"], on_cpu.load_arrays("samples")["samples"])
    if torch.cuda.is_available():
        return                                            # the refusal below needs a machine without CUDA
    before = set(tmp_path.iterdir())
    assert main(["sample", "--model", "gaussian", "--data", "digits", "--subset", "20", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path), "--device", "cuda", "--no-progress"]) == 2
    assert "no CUDA device" in capsys.readouterr().err and set(tmp_path.iterdir()) == before

