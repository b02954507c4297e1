"""The information run directory: CLI, resume after an interruption, refusal of changed options."""
import numpy as np
import pytest

import scorefield as sf
from scorefield.analysis import information as info
from scorefield.cli import main
from scorefield.experiments.information_run import information_run

ARGS = ["information", "--model", "tanh", "--data", "two-image", "--data-opt", "size=12", "--patch", "3",
        "--model-padding", "circular", "--n", "24", "--steps", "6", "--no-progress"]


def test_cli_writes_curves_collapse_numbers_and_figures(tmp_path, capsys):
    assert main([*ARGS, "--out", str(tmp_path), "--name", "i"]) == 0
    run = sf.runs.RunDir.open(tmp_path / "i")
    for name in ("trajectory.npz", "two_point.csv", "collapse.md", "information.png", "rho.png", "summary.json"):
        assert run.exists(name), name
    summary = run.read_json("summary.json")
    assert summary["method"] == "translation" and summary["n"] == 24
    assert np.isfinite(summary["collapse_rho"]["r"])
    assert "collapse_rho" in capsys.readouterr().out


def test_resume_redoes_only_missing_parts_and_gives_the_same_moments(tmp_path):
    data = sf.data.load("two-image", size=12)
    model = sf.models.make("tanh", data, patch_size=3, padding="circular")
    whole = information_run(model, (1, 12, 12), n=20, steps=5, part_size=8, out=tmp_path, name="a", progress=False)
    (whole.path / "parts" / "part-002.npz").unlink()              # as if killed before the last part finished
    (whole.path / "summary.json").unlink()
    resumed = information_run(model, (1, 12, 12), n=20, steps=5, part_size=8, out=tmp_path, resume=whole.path,
                              progress=False)
    fresh = information_run(model, (1, 12, 12), n=20, steps=5, part_size=8, out=tmp_path, name="b", progress=False)
    a, b = info.Trajectory.load(resumed.file("trajectory.npz")), info.Trajectory.load(fresh.file("trajectory.npz"))
    np.testing.assert_array_equal(a.sum_auto, b.sum_auto)
    assert resumed.read_json("summary.json")["n"] == 20
    with pytest.raises(ValueError, match="steps"):
        information_run(model, (1, 12, 12), n=20, steps=7, part_size=8, out=tmp_path, resume=whole.path,
                        progress=False)
