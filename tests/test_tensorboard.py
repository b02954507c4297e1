"""scorefield.tensorboard_log: training and sampling runs write scalar event files to RUN/tb when tensorboard is
installed, and nothing (with the same results) when it is absent or turned off."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import scorefield as sf
import scorefield.tensorboard_log as tb
from scorefield.experiments.sample_run import SampleConfig, run_sampling


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _train(tmp_path, name):
    data = sf.data.load("grf", n=16, size=8)
    torch.manual_seed(0)                                    # the same initial weights in every call
    return sf.training.train(sf.models.make("convnet", data, preset="tiny"), data, out=tmp_path, name=name, steps=4,
                             batch_size=8, log_every=2, progress=False)


def test_training_and_sampling_write_scalars_that_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    result = _train(tmp_path, "train")
    tb.close(result.run)
    scalars = _scalars(result.run.path / "tb")
    metrics = [m for m in result.run.read_metrics() if "loss" in m]
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert "train/lr" in scalars

    run = run_sampling(SampleConfig(model="gaussian", data="digits", data_options={"subset": 30}, n=3, steps=3,
                                    batch_size=2), root=tmp_path, name="sample", progress=False)
    tb.close(run)
    scalars = _scalars(run.path / "tb")
    assert [s for s, _ in scalars["sampling/seconds"]] == [0, 1]
    summary = run.read_json("summary.json")
    assert scalars["summary/median_rms_distance"][0][1] == pytest.approx(summary["median_rms_distance"], rel=1e-6)


def test_without_tensorboard_nothing_is_written_and_results_are_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "_available", False)           # as if the package were not installed
    off = _train(tmp_path, "off")
    assert not (off.run.path / "tb").exists()
    monkeypatch.setattr(tb, "_available", None)
    monkeypatch.setenv("SCOREFIELD_TENSORBOARD", "0")
    assert not tb.available()
    again = _train(tmp_path, "again")
    assert not (again.run.path / "tb").exists()
    assert [m["loss"] for m in off.losses] == [m["loss"] for m in again.losses]
    tb.log(again.run, 0, x=1.0)                              # a no-op, not an error
    assert not (again.run.path / "tb").exists()
    if importlib.util.find_spec("tensorboard") is not None:  # logging on changes no result
        monkeypatch.delenv("SCOREFIELD_TENSORBOARD")
        on = _train(tmp_path, "on")
        assert (on.run.path / "tb").is_dir() and [m["loss"] for m in on.losses] == [m["loss"] for m in off.losses]


def test_calibration_and_prediction_write_their_schedule_and_summary(tmp_path):
    pytest.importorskip("tensorboard")
    data = sf.data.load("digits", subset=20)
    network = sf.models.make("bbels", data, patch_size=[3, 5], padding="zeros")
    cal = sf.experiments.calibrate(network, data, machine="bbels", patch_sizes=[3, 5], seeds=range(2), steps=3,
                                   out=tmp_path, progress=False)
    tb.close()
    scalars = _scalars(cal.run_dir / "tb")
    assert [v for _, v in scalars["calibrate/patch_size"]] == [float(p) for p in cal.chosen]
    assert any(tag.startswith("summary/") for tag in scalars)
    res = sf.experiments.predict(network, data, theories=["is"], seeds=range(2), steps=3, out=tmp_path,
                                 progress=False)
    tb.close()
    assert any(tag.startswith("summary/") for tag in _scalars(res.run_dir / "tb"))


def test_information_and_criticality_write_their_summaries(tmp_path):
    pytest.importorskip("tensorboard")
    from scorefield.experiments import criticality_run, information_run

    data = sf.data.load("digits", subset=20)
    model = sf.models.make("els", data, patch_size=3, padding="circular")
    runs = [information_run(model, (1, 8, 8), n=4, steps=3, out=tmp_path, name="info", progress=False),
            criticality_run(model, (1, 8, 8), n=2, steps=8, softening_every=4, out=tmp_path, name="crit",
                            progress=False, figures=False)]
    tb.close()
    for run in runs:
        assert any(tag.startswith("summary/") for tag in _scalars(run.path / "tb")), run.path
