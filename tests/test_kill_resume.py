"""Kill-and-resume with real processes: `kill -9` or Ctrl-C at a moment of the run, then `--resume`, must give
the same final outputs as an uninterrupted run (bitwise: one thread, so the CPU arithmetic is deterministic)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scorefield.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SAMPLE = ["sample", "--model", "els", "--patch", "3", "--data", "digits", "--subset", "60", "--n", "8",
          "--batch-size", "2", "--steps", "12", "--no-progress"]
TRAIN = ["train", "--arch", "convnet", "--preset", "tiny", "--data", "digits", "--subset", "64", "--steps", "150",
         "--batch-size", "8", "--checkpoint-every", "20", "--lr", "1e-3", "--threads", "1", "--no-progress"]


def _cli(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys; from scorefield.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(argv: list[str]) -> subprocess.CompletedProcess:
    proc = _cli(argv)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _interrupt_when(argv: list[str], ready: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the command, wait until `ready` exists (some work finished), then send `sig`."""
    proc = _cli(argv)
    deadline = time.time() + 240
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run never reached the point to interrupt")
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_sampling_killed_mid_run_resumes_to_identical_outputs(tmp_path):
    _finish([*SAMPLE, "--out", str(tmp_path), "--name", "whole"])
    cut = _interrupt_when([*SAMPLE, "--out", str(tmp_path), "--name", "cut"],
                          tmp_path / "cut" / "batches" / "batch-0001.npz", signal.SIGKILL)
    assert cut.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "samples.npz").exists()
    _finish(["sample", "--resume", str(tmp_path / "cut"), "--no-progress"])
    whole, resumed = _arrays(tmp_path / "whole" / "samples.npz"), _arrays(tmp_path / "cut" / "samples.npz")
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key], err_msg=key)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["n"] == 8


def test_sampling_killed_while_writing_final_outputs_resumes(tmp_path):
    main([*SAMPLE, "--n", "4", "--out", str(tmp_path), "--name", "run"])
    run = tmp_path / "run"
    reference = {name: (run / name).read_bytes() for name in ("summary.json", "memorization.csv")}
    # a kill between the final files: some written, the last ones not, a writer's temporary left behind
    for name in ("summary.json", "samples.png", "memorization.md"):
        (run / name).unlink()
    (run / ".summary.json.tmp-99999").write_bytes(b'{"n": ')
    assert main(["sample", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "summary.json").read_bytes() == reference["summary.json"]
    assert (run / "memorization.csv").read_bytes() == reference["memorization.csv"]
    assert (run / "samples.png").exists() and (run / "memorization.md").exists()
    assert not list(run.glob(".*.tmp-*"))


def test_training_killed_then_resumed_gives_the_same_weights(tmp_path):
    _finish([*TRAIN, "--out", str(tmp_path), "--name", "whole"])
    cut = _interrupt_when([*TRAIN, "--out", str(tmp_path), "--name", "cut"],
                          tmp_path / "cut" / "checkpoint.json", signal.SIGKILL)
    assert cut.returncode == -signal.SIGKILL
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as fh:      # a line torn by the kill
        fh.write('{"step": 99, "lo')
    _finish(["train", "--resume", str(tmp_path / "cut"), "--no-progress"])
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "cut" / "model.safetensors").read_bytes()


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    run = tmp_path / "cut"
    cut = _interrupt_when([*TRAIN, "--out", str(tmp_path), "--name", "cut"], run / "metrics.jsonl", signal.SIGINT)
    assert cut.returncode == 130, cut.stderr
    assert f"scorefield train --resume {run}" in cut.stderr and "Traceback" not in cut.stderr
    step = json.loads((run / "checkpoint.json").read_text())["step"]
    assert 0 < step < 150                                  # the step reached, not only the periodic checkpoint
    _finish([*TRAIN, "--out", str(tmp_path), "--name", "whole"])
    _finish(["train", "--resume", str(run), "--no-progress"])
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_resume_with_different_options_is_refused_with_the_differences(tmp_path, capsys):
    assert main([*SAMPLE, "--n", "2", "--out", str(tmp_path), "--name", "s"]) == 0
    code = main(["sample", "--resume", str(tmp_path / "s"), "--n", "5", "--steps", "7"])
    err = capsys.readouterr().err
    assert code != 0 and "n 2 → 5" in err and "steps 12 → 7" in err
    train = [*TRAIN, "--out", str(tmp_path), "--name", "t"]
    train[train.index("--steps") + 1] = "4"
    assert main(train) == 0
    code = main(["train", "--resume", str(tmp_path / "t"), "--lr", "0.5", "--batch-size", "3"])
    err = capsys.readouterr().err
    assert code != 0 and "--lr 0.001 → 0.5" in err and "--batch-size 8 → 3" in err
    assert main(["train", "--resume", str(tmp_path / "t"), "--steps", "6", "--no-progress"]) == 0   # allowed


def test_a_second_process_cannot_work_on_a_locked_run(tmp_path):
    from scorefield.runs import RunDir, RunError

    run = RunDir.create("sample", {}, root=tmp_path, name="r")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from scorefield.runs import RunDir; "
                               f"held = RunDir.open({str(run.path)!r}).lock(); print('locked', flush=True); "
                               "time.sleep(30)"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match="being worked on by process"):
            RunDir.open(run.path).lock()
    finally:
        holder.kill()
        holder.wait()
    RunDir.open(run.path).lock().release()                 # the lock dies with its process
