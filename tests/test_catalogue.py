"""The bad-input catalogue: every entry is something a new user typed, and each must end in one clear error.

Each CLI entry must exit non-zero with one line `scorefield CMD: error: ...` (or argparse's usage error), no
traceback, a message naming what was wrong (the `expect` pattern), and no run directory left behind. The
README's reliability catalogue counts these entries by kind (`catalogue_counts`).
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scorefield.cli import main

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "scorefield" / "pretrained" / "mnist-resnet-small"
DIGITS = ["--data", "digits", "--subset", "20"]
SAMPLE = ["sample", "--model", "els", "--patch", "3", *DIGITS, "--n", "2", "--steps", "2"]
TRAIN = ["train", "--arch", "convnet", "--preset", "tiny", *DIGITS, "--steps", "1", "--batch-size", "4"]
PREDICT = ["predict", "--model", "convnet", "--model-opt", "preset=tiny", *DIGITS, "--seeds", "1", "--steps", "2"]


@dataclass(frozen=True)
class Case:
    kind: str          # the README catalogue's row
    argv: tuple[str, ...]
    expect: str        # a regex the one-line message must match (case-insensitive)


def C(kind: str, argv: list[str], expect: str) -> Case:
    return Case(kind, tuple(argv), expect)


CASES = [
    # ---- misspelled names and option keys: the closest valid name is suggested
    C("name", ["sample", "--model", "elss", *DIGITS], "did you mean 'els'"),
    C("name", [*SAMPLE, "--sampler", "ddimm"], "did you mean 'ddim'"),
    C("name", [*SAMPLE, "--schedule", "cosin"], "did you mean 'cosine'"),
    C("name", ["sample", "--model", "els", "--patch", "3", "--data", "digitz"], "did you mean 'digits'"),
    C("name", [*SAMPLE, "--model-opt", "patchsize=3"], "did you mean 'patch_size'"),
    C("name", [*SAMPLE, "--sampler-opt", "etaa=0.5"], "did you mean 'eta'"),
    C("name", [*SAMPLE, "--data-opt", "subsett=3"], "subsett"),
    C("name", [*TRAIN, "--optimizer", "adamm"], "adamm"),
    C("name", [*TRAIN, "--time-sampling", "uniformm"], "uniformm"),
    C("name", [*TRAIN, "--schedule", "linearr"], "did you mean 'linear"),
    C("name", [*PREDICT, "--theories", "is,elss"], "elss"),
    C("name", ["calibrate", "--model", "convnet", "--model-opt", "preset=tiny", *DIGITS, "--machine", "elx"],
      "elx"),
    C("name", ["information", "--model", "els", "--patch", "3", *DIGITS, "--sampler", "eulr"], "eulr"),
    C("name", ["receptive-field", "--model", "els", "--patch", "3", *DIGITS, "--method", "jvpp"], "jvpp"),
    C("name", [*SAMPLE, "--padding", "reflect"], "invalid choice"),
    C("name", ["train", "--arch", "resnett"], "invalid choice"),
    # ---- values out of range, before any work
    C("range", [*SAMPLE, "--eta", "-1"], "eta"),
    C("range", [*SAMPLE, "--eta", "1.5"], "eta"),
    C("range", [*SAMPLE, "--eta", "nan"], "eta"),
    C("range", ["sample", "--model", "els", "--patch", "4", *DIGITS], "odd"),
    C("range", ["sample", "--model", "els", "--patch", "0", *DIGITS], "patch"),
    C("range", ["sample", "--model", "els", "--patch", "-3", *DIGITS], "patch"),
    C("range", ["sample", "--model", "els", "--patch", "1001", *DIGITS], "exceeds"),
    C("range", ["sample", "--model", "bbels", "--patch", "3,4", *DIGITS], "odd"),
    C("range", ["sample", "--model", "els", "--patch", "3,x", *DIGITS], "patch"),
    C("range", [*SAMPLE, "--n", "0"], "--n"),
    C("range", [*SAMPLE, "--n", "-3"], "--n"),
    C("range", [*SAMPLE, "--labels", "1,x", "--conditional"], "--labels"),
    C("range", [*SAMPLE, "--n", "1e9"], "--n"),
    C("range", [*SAMPLE, "--steps", "0"], "steps"),
    C("range", [*SAMPLE, "--batch-size", "0"], "batch"),
    C("range", ["sample", "--model", "els", "--patch", "3", "--data", "digits", "--subset", "0"], "subset"),
    C("range", ["sample", "--model", "els", "--patch", "3", "--data", "digits", "--subset", "-5"], "subset"),
    C("range", [*SAMPLE, "--guidance", "2"], "conditional"),
    C("range", [*SAMPLE, "--conditional", "--guidance", "2", "--guidance-window", "sigma:5:1"], "min"),
    C("range", [*SAMPLE, "--conditional", "--guidance", "2", "--guidance-window", "sigmaa:1:5"], "sigma"),
    C("range", [*SAMPLE, "--guidance-window", "1:2:3:4"], "guidance-window"),
    C("range", [*SAMPLE, "--guidance-window", "0.2:0.5"], "without a guidance scale"),
    C("range", [*SAMPLE, "--labels", "3"], "unconditional"),
    C("range", ["sample", "--model", "els", "--patch", "3", "--conditional", *DIGITS, "--labels", "12"], "12"),
    C("range", [*TRAIN, "--lr", "0"], "lr"),
    C("range", [*TRAIN, "--lr", "-1"], "lr"),
    C("range", [*TRAIN, "--lr", "nan"], "lr"),
    C("range", [*TRAIN, "--samples", "-3"], "samples"),
    C("range", [*TRAIN, "--batch-size", "0"], "batch"),
    C("range", [*TRAIN, "--ema", "1.5"], "ema"),
    C("range", [*TRAIN, "--label-dropout", "2"], "label"),
    C("range", [*TRAIN, "--grad-clip", "-1"], "grad"),
    C("range", [*TRAIN, "--checkpoint-every", "0"], "checkpoint"),
    C("range", [*TRAIN, "--epochs", "0", "--steps", "0"], "steps"),
    C("range", [*TRAIN, "--width", "0"], "width"),
    C("range", [*PREDICT, "--seeds", "0"], "seeds"),
    C("range", [*PREDICT, "--patch-sizes", "4"], "odd"),
    C("range", ["information", "--model", "els", "--patch", "3", *DIGITS, "--n", "0"], "--n"),
    C("range", ["information", "--model", "els", "--patch", "3", *DIGITS, "--times", "x"], "times"),
    C("range", ["receptive-field", "--model", "els", "--patch", "3", *DIGITS, "--alpha-bars", "2"], "alpha"),
    C("range", ["receptive-field", "--model", "els", "--patch", "3", *DIGITS, "--mass", "1.5"], "mass"),
    # ---- memory: refused with the estimate, before allocating
    C("memory", [*SAMPLE, "--n", "1000000000"], "MiB free"),
    C("memory", [*SAMPLE, "--n", "2000", "--steps", "100000000", "--save-trajectory"], "MiB free"),
    C("memory", ["sample", "--model", "gaussian", "--data", "grf", "--data-opt", "size=256", "--data-opt",
                 "n=2", "--data-opt", "channels=3", "--n", "1", "--steps", "2"], "MiB free"),
    C("memory", [*TRAIN, "--width", "100000"], "MiB free"),
]


def _missing(tmp: Path) -> list[Case]:
    return [
        C("file", ["sample", "--model-run", str(tmp / "nope"), "--n", "1"], "nope"),
        C("file", ["sample", "--model", "els", "--patch", "3", "--data", "mnist-idx", "--root", str(tmp / "nope")],
          "nope"),
        C("file", ["sample", "--model", "els", "--patch", "3", "--data", "cifar10", "--root", str(tmp)],
          "cifar"),
        C("file", ["mosaic", str(tmp / "nope")], "nope"),
        C("file", [*SAMPLE, "--resume", str(tmp / "nope")], "nope"),
        C("file", ["predict", "--pretrained", str(tmp / "nope"), "--seeds", "1"], "nope"),
    ]


def _damaged_runs(tmp: Path) -> list[Case]:
    """A copy of the bundled trained run, damaged one file at a time."""
    cases = []
    crafted = json.loads((PRETRAINED / "model.json").read_text())
    crafted["model"]["width"] = 100_000_000
    for name, damage in [("model.safetensors", b""), ("model.safetensors", None), ("model.json", None),
                         ("config.json", None), ("model.json", json.dumps(crafted).encode())]:
        run = tmp / f"damaged-{len(cases)}"
        shutil.copytree(PRETRAINED, run)
        path = run / name
        if damage is None:
            damage = path.read_bytes()[: len(path.read_bytes()) // 2]
        path.write_bytes(damage)
        expect = "MiB free" if b"100000000" in damage else re.escape(name)
        cases.append(C("file", ["sample", "--model-run", str(run), "--n", "1", "--steps", "2"], expect))
    return cases


def _idx(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = images.shape
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def _bad_files(tmp: Path) -> list[Case]:
    _idx(tmp / "empty", np.zeros((0, 28, 28)), np.zeros(0))
    _idx(tmp / "labels", np.zeros((3, 28, 28)), np.array([1, 200, 3]))
    bad_config = tmp / "badconfig"
    shutil.copytree(PRETRAINED, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    config["wibble"] = 1
    (bad_config / "config.json").write_text(json.dumps(config))
    model_run = ["sample", "--model", "els", "--patch", "3", "--data", "mnist-idx", "--root"]
    return [
        C("file", [*model_run, str(tmp / "empty"), "--n", "1"], "0 images|no images|empty"),
        C("file", [*model_run, str(tmp / "labels"), "--n", "1"], "200"),
        C("file", [*TRAIN, "--resume", str(PRETRAINED.parent / "nonexistent-run")], "nonexistent-run"),
    ]


def all_cases(tmp: Path) -> list[Case]:
    return [*CASES, *_missing(tmp), *_damaged_runs(tmp), *_bad_files(tmp)]


def catalogue_counts(tmp: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for case in all_cases(tmp):
        counts[case.kind] = counts.get(case.kind, 0) + 1
    return counts


def _run(argv: tuple[str, ...], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main([*argv, "--out", str(out)] if _takes_out(argv) else list(argv))
    except SystemExit as exc:                 # argparse's own usage errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _takes_out(argv: tuple[str, ...]) -> bool:
    return argv[0] in {"sample", "train", "predict", "calibrate", "information", "receptive-field"}


def _check(case: Case, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    code, err = _run(case.argv, out, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0, f"{case.argv} succeeded"
    assert "Traceback" not in err, f"{case.argv}: traceback\n{err}"
    message = lines[-1] if lines else ""
    assert re.search(r"^scorefield [\w-]+: error: |^usage:|error: argument", message) or "error:" in message, err
    assert re.search(case.expect, message, re.IGNORECASE), f"{case.argv}: {message!r} lacks /{case.expect}/"
    assert not any(out.iterdir()), f"{case.argv} left {list(out.iterdir())}"


@pytest.mark.parametrize("index", range(len(CASES)))
def test_cli_bad_input_gets_one_clear_error(index, tmp_path, capsys):
    _check(CASES[index], tmp_path, capsys)


@pytest.mark.parametrize("maker", [_missing, _damaged_runs, _bad_files])
def test_cli_bad_files_get_one_clear_error(maker, tmp_path, capsys):
    for case in maker(tmp_path):
        _check(case, tmp_path, capsys)
