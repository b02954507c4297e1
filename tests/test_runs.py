import numpy as np
import pytest

from scorefield.runs import RunDir, RunError


def test_run_directory_never_overwrites(tmp_path):
    a = RunDir.create("sample", {"n": 3}, root=tmp_path, name="x")
    b = RunDir.create("sample", {"n": 4}, root=tmp_path, name="x")
    assert a.path != b.path and a.config["n"] == 3 and b.config["n"] == 4
    assert (a.path / "environment.json").exists()
    a.save_arrays("batch-0", samples=np.ones((2, 1, 3, 3)))
    with pytest.raises(RunError, match="overwrite"):
        a.save_arrays("batch-0", samples=np.zeros(1))
    assert a.load_arrays("batch-0")["samples"].shape == (2, 1, 3, 3)
    a.log_metrics(step=1, loss=0.5)
    a.log_metrics(step=2, loss=0.25)
    assert [m["loss"] for m in a.read_metrics()] == [0.5, 0.25]
    a.save_table("t", [{"a": 1, "b": 0.5}, {"a": 2, "b": 0.25}])
    assert (a.path / "t.csv").read_text().splitlines()[0] == "a,b"
    assert "| a | b |" in (a.path / "t.md").read_text()
    with pytest.raises(RunError, match="not a run directory"):
        RunDir.open(tmp_path / "missing")
