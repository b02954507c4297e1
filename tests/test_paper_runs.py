"""`paper-run`: every row of kamb-ganguli Tables 1–2 is set up at the paper's size and recipe; a tiny run on
user files goes end to end from the CLI and from Python, resumes after an interruption without retraining,
redoes nothing when finished, and bad input gets one clear error."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scorefield as sf
from scorefield.cli import main
from scorefield.experiments import paper_runs
from scorefield.experiments.paper_runs import PAPER_RUNS, PaperRunError, paper_run
from test_data import write_cifar, write_idx_set

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"subset": 16, "steps": 2, "batch_size": 4, "width": 8, "seeds": 2, "cal_seeds": 1, "sizes": [3, 5],
        "sampler_steps": 4}
TINY_FLAGS = ["--subset", "16", "--train-steps", "2", "--batch-size", "4", "--width", "8", "--seeds", "2",
              "--cal-seeds", "1", "--sizes", "3,5", "--sampler-steps", "4", "--no-progress"]
STAGE_FOLDERS = ("train", "calibrate", "predict-150", "predict-20")


def write_faces(root: Path, n: int = 16) -> Path:
    """A CelebA-like folder: n RGB PNGs of 40×36 (centre-cropped and resized to 32×32 by the loader)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
    return root


def write_fashion(root: Path, n: int = 16) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    write_idx_set(root, "train", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 4, gz=True)
    return root


def outputs(run_dir: Path) -> dict[str, int]:
    """mtime of every file of a run (but the lock, which a reopening touches)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".lock"}


def check_comparison(run_dir: Path, name: str) -> None:
    row = PAPER_RUNS[name]
    for sub in STAGE_FOLDERS:
        assert (run_dir / sub / "config.json").is_file(), sub
    md = (run_dir / "paper_comparison.md").read_text()
    for table in ("table1", "table2"):
        for value in getattr(row, table).values():
            assert f"{value:.4g}" in md
    rows = paper_runs.read_csv(run_dir / "paper_comparison.csv")
    assert {r["theory"] for r in rows} == {"is", "ls", row.machine} and len(rows) == 6
    for r in rows:
        assert math.isfinite(r["r2_median"]) and math.isfinite(r["pearson_median"]) and r["n"] == 2
        column = "els" if r["theory"] == row.machine else r["theory"]
        table = "table1" if r["table"].startswith("Table 1") else "table2"
        assert r["paper_corr"] == getattr(row, table)[column]
    headline = [r for r in rows if r["theory"] == row.headline]
    assert all(r["paper_beats_is"] != "" and 0 <= r["fraction_beats_is"] <= 1 for r in headline)


def test_every_row_is_the_papers_network_and_recipe() -> None:
    assert len(PAPER_RUNS) == 10 and all(r.machine == ("bbels" if r.padding == "zeros" else "els")
                                         for r in PAPER_RUNS.values())
    recipe = sf.training.recipe("kamb-ganguli")
    assert recipe["epochs"] == 300 and recipe["lr"] == 1e-4 and recipe["batch_size"] == 128
    for name, row in PAPER_RUNS.items():
        net = paper_runs.network_options(name)
        assert net["preset"] == "paper" and net["padding"] == row.padding and net["conditional"] == row.conditional
        if row.arch == "resnet":
            assert net["width"] == 256
        else:
            assert net["channels"] == [64, 128, 256]
        assert paper_runs.training_options(name) == recipe
        assert row.conditional == (row.dataset in ("fashion-mnist", "cifar10"))
        for table in (row.table1, row.table2):
            assert set(table) == {"els", "ls", "is", "beats_is"} and all(0 < v <= 1 for v in table.values())
        assert ("--root" in paper_runs.paper_command(name)) == row.needs_root
    small = paper_runs.network_options("cifar10-unet-zeros", width=8)
    assert small["channels"] == [8, 16, 32]
    assert paper_runs.training_options("mnist-resnet-zeros", steps=5, batch_size=4)["steps"] == 5
    assert sf.experiments.paper_runs.paper_run is paper_run        # lazily exported


def test_data_of_the_file_rows(tmp_path: Path) -> None:
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    write_cifar(cifar, per_batch=2)
    data = sf.data.load(**paper_runs.data_spec("cifar10-resnet-zeros", cifar, subset=4))
    assert data.images.shape == (4, 3, 32, 32) and data.labels is not None
    fashion = sf.data.load(**paper_runs.data_spec("fashion-mnist-unet-zeros", write_fashion(tmp_path / "f")))
    assert fashion.images.shape == (16, 1, 32, 32)
    faces = sf.data.load(**paper_runs.data_spec("celeba-unet-zeros", write_faces(tmp_path / "faces")))
    assert faces.images.shape == (16, 3, 32, 32) and faces.labels is None


def test_cli_end_to_end_and_finished_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    faces = write_faces(tmp_path / "faces")
    out = tmp_path / "runs"
    assert main(["paper-run", "celeba-resnet-zeros", "--root", str(faces), "--out", str(out), "--name", "r",
                 *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    run_dir = out / "r"
    assert "paper_corr" in printed and f"run directory: {run_dir}" in printed
    check_comparison(run_dir, "celeba-resnet-zeros")
    before = outputs(run_dir)
    assert main(["paper-run", "--resume", str(run_dir), "--no-progress"]) == 0      # finished: nothing redone
    assert outputs(run_dir) == before and "paper_corr" in capsys.readouterr().out
    # a resume that changes an override is refused with the difference named
    assert main(["paper-run", "--resume", str(run_dir), "--seeds", "3", "--no-progress"]) == 2
    assert "options differ" in capsys.readouterr().err
    assert main(["paper-run", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PAPER_RUNS) and "scorefield paper-run cifar10-unet-zeros" in listed


def test_api_resumes_after_training_without_retraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scorefield.experiments import calibration, prediction

    root = write_fashion(tmp_path / "fashion")
    real = calibration.calibrate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "calibrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        paper_run("fashion-mnist-resnet-zeros", root, out=tmp_path, run_name="r", progress=False, **TINY)
    run_dir = tmp_path / "r"
    trained = outputs(run_dir / "train")
    assert "model.safetensors" in trained and not (run_dir / "paper_comparison.csv").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("redid a finished stage")

    monkeypatch.setattr(calibration, "calibrate", real)
    monkeypatch.setattr(sf.training, "train", must_not_run)
    result = paper_run("fashion-mnist-resnet-zeros", resume=run_dir, progress=False)
    assert outputs(run_dir / "train") == trained
    assert result.run_dir == run_dir and len(result.table) == 6 and result.patch_sizes
    assert set(result.stages) == {"train", "calibrate", "predict-table1", "predict-table2", "compare"}
    check_comparison(run_dir, "fashion-mnist-resnet-zeros")

    # killed after a stage finished but before stages.json recorded it: the stage's own files say it is done

    stages = json.loads((run_dir / "stages.json").read_text())
    for key in ("calibrate", "predict-table2", "compare"):
        del stages[key]
    (run_dir / "stages.json").write_text(json.dumps(stages))
    (run_dir / "paper_comparison.csv").unlink()
    (run_dir / "paper_comparison.md").unlink()
    kept = {k: v for k, v in outputs(run_dir).items() if k.startswith(STAGE_FOLDERS)}
    monkeypatch.setattr(calibration, "calibrate", must_not_run)
    monkeypatch.setattr(prediction, "predict", must_not_run)
    again = paper_run("fashion-mnist-resnet-zeros", resume=run_dir, progress=False)
    assert {k: v for k, v in outputs(run_dir).items() if k.startswith(STAGE_FOLDERS)} == kept
    assert again.table == result.table and again.patch_sizes == result.patch_sizes


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PaperRunError, match="unknown paper run 'cifar-resnet'.*cifar10-resnet-zeros"):
        paper_run("cifar-resnet", out=tmp_path)
    with pytest.raises(PaperRunError, match="give root"):
        paper_run("cifar10-resnet-zeros", out=tmp_path)
    with pytest.raises(PaperRunError, match="root folder not found"):
        paper_run("celeba-unet-zeros", tmp_path / "missing", out=tmp_path)
    with pytest.raises(PaperRunError, match="unknown override.*epochs"):
        paper_run("mnist-resnet-zeros", out=tmp_path, epochs=3)
    with pytest.raises(PaperRunError, match="sizes must be odd"):
        paper_run("mnist-resnet-zeros", out=tmp_path, sizes=[4])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            paper_run("mnist-resnet-zeros", out=tmp_path, device="cuda")
    assert not list(tmp_path.iterdir())                              # refused before any run directory
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(sf.data.DataError, match="data_batch_1"):        # a folder without the dataset's files
        paper_run("cifar10-resnet-zeros", empty, out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    assert main(["paper-run", "cifar10-unet-zeros", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
