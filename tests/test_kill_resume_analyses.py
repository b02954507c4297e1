"""Kill-and-resume of the analyses with real processes: `kill -9` at a finished unit of work and while the final
outputs are being written, Ctrl-C (SIGINT) with its printed resume command, then `scorefield CMD --resume RUN`
must give the same final outputs as an uninterrupted run: tables, per-sample data, arrays and summary numbers,
bitwise (one thread, so the CPU arithmetic is deterministic), all but the durations and the engine bookkeeping.
Also: a resume with changed options is refused with the differences listed, and a second process is kept out of
a run directory that another one holds."""
from __future__ import annotations

import csv
import io
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
MACHINE = ["--model", "els", "--patch", "5", "--data", "digits", "--subset", "40"]
COMMANDS = {
    "calibrate": ["calibrate", *MACHINE, "--sizes", "3,5,7", "--seeds", "3", "--steps", "6", "--no-progress"],
    "predict": ["predict", *MACHINE, "--theories", "is,els", "--sizes", "3,5", "--cal-seeds", "2", "--seeds", "3",
                "--steps", "5", "--no-progress"],
    "information": ["information", *MACHINE, "--n", "8", "--part-size", "2", "--steps", "4", "--no-progress"],
    "criticality": ["criticality", *MACHINE, "--n", "3", "--steps", "8", "--softening-every", "4",
                    "--no-progress"],
    "guidance-pulses": ["guidance-pulses", "--arms", "network", "--sigma-c", "1.5", "--network-steps", "2",
                        "--network-opt", "batch_size=8", "--subset", "200", "--classes", "0,1", "--n", "2",
                        "--steps", "5", "--classifier-epochs", "1", "--classifier-train", "100",
                        "--classifier-eval", "100", "--bootstrap", "20", "--no-progress"],
    "compare-processes": ["compare-processes", "--datasets", "grf", "--processes", "standard,matched", "--n-train",
                          "32", "--n-test", "32", "--n-samples", "16", "--steps", "3", "--arch", "convnet",
                          "--preset", "tiny", "--sample-steps", "3", "--no-figures", "--no-progress"],
}
# a file whose appearance proves that a unit of work (step, part, class, pair) is finished and saved
UNIT = {"calibrate": "steps/step-001.npz", "information": "parts/part-000.npz",
        "criticality": "parts/part-000.npz", "guidance-pulses": "network/class-0-unguided.npz",
        "compare-processes": "results/grf-standard.json"}
# per command: an option changed on resume, and how the refusal lists it
CHANGED = {"calibrate": (["--seeds", "4"], "--seeds 3 → 4"), "predict": (["--seeds", "5"], "--seeds 3 → 5"),
           "information": (["--steps", "5"], "--steps 4 → 5"), "criticality": (["--steps", "9"], "--steps 8 → 9"),
           "guidance-pulses": (["--strength", "5"], "--strength 3.0 → 5.0"),
           "compare-processes": (["--lr", "0.5"], "--lr 0.002 → 0.5")}
# durations and bookkeeping: not results (the engine log of a unit killed between its save and its log line is
# not written again)
NOT_RESULTS = {"seconds", "cpu_seconds", "seconds_per_part", "cpu_seconds_per_part", "train_seconds",
               "sample_seconds", "time", "engine", "cpu_s", "wall_s"}
NOT_OUTPUTS = {"config.json", "environment.json", "checkpoint.json"}
# Figures are drawn from the saved data and are not compared; the commands whose final writes are not interrupted
# here skip drawing them (a placeholder file stands in), which keeps these tests fast.
PLACEHOLDER_FIGURES = ("information", "criticality", "guidance-pulses", "compare-processes")
PLACEHOLDER = """
def placeholder_figure(self, name, fig, replace=False, dpi=120):
    import matplotlib.pyplot as plt
    from scorefield.runs import atomic_write_bytes
    plt.close(fig)
    target = self._target(name if name.endswith(".png") else f"{name}.png", replace)
    atomic_write_bytes(target, b"")
    return target
"""
SLOW = """
import time
from scorefield.runs import RunDir
def _slowed(method):
    def slow(self, *args, **kwargs):
        {before}
        out = method(self, *args, **kwargs)
        {after}
        return out
    return slow
RunDir.{method} = _slowed(RunDir.{method})
"""
_defined: dict[str, object] = {}
exec(PLACEHOLDER, _defined)


# ---- running and interrupting --------------------------------------------------------------------------------

def _start(argv: list[str], slow_figures: bool = False, slow_units: bool = True) -> subprocess.Popen:
    """The command in its own process; slow_figures: each figure waits a second first, so that a kill sent when
    the first final file appears lands while the final outputs are being written, however busy the machine;
    slow_units: likewise a pause after each saved array file (a unit), so the run is still at that unit."""
    # Ctrl-C must reach the child as Python's KeyboardInterrupt even when pytest itself was started with SIGINT
    # ignored (a shell without job control starts `cmd &` that way, and the child would inherit it)
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from scorefield.cli import main\n")
    if argv[0] in PLACEHOLDER_FIGURES:
        code += PLACEHOLDER + "from scorefield.runs import RunDir\nRunDir.save_figure = placeholder_figure\n"
    if slow_figures:
        code += SLOW.format(method="save_figure", before="time.sleep(1.0)", after="")
    if slow_units:
        code += SLOW.format(method="save_arrays", before="", after="time.sleep(0.3)")
    return subprocess.Popen([sys.executable, "-c", code + "sys.exit(main(sys.argv[1:]))", *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _main(argv: list[str]) -> int:
    """The command in this process (with placeholder figures where the subprocesses draw none)."""
    from scorefield.runs import RunDir

    with pytest.MonkeyPatch.context() as mp:
        if argv[0] in PLACEHOLDER_FIGURES:
            mp.setattr(RunDir, "save_figure", _defined["placeholder_figure"])
        return main(argv)


def _wait_for(proc: subprocess.Popen, ready: Path) -> None:
    deadline = time.time() + 240
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {ready.name} appeared: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never wrote {ready}")
        time.sleep(0.01)


def _interrupt_when(argv: list[str], ready: Path, sig: int, slow_figures: bool = False
                    ) -> subprocess.CompletedProcess:
    """Run the command in its own process, send `sig` the moment `ready` exists; its exit and output. With
    slow_figures (a kill while finishing), units are not slowed."""
    proc = _start(argv, slow_figures, slow_units=not slow_figures)
    _wait_for(proc, ready)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _killed(result: subprocess.CompletedProcess, run: Path) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (run / "summary.json").exists()                      # it stopped before finishing


def _resume(command: str, run: Path) -> None:
    assert _main([command, "--resume", str(run), "--no-progress"]) == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """Uninterrupted runs, made once per command on demand: {command: run directory}."""
    made: dict[str, Path] = {}

    def get(command: str) -> Path:
        if command not in made:
            root = tmp_path_factory.mktemp(command)
            assert _main([*COMMANDS[command], "--out", str(root), "--name", "whole"]) == 0
            made[command] = root / "whole"
        return made[command]

    return get


# ---- comparing final outputs ---------------------------------------------------------------------------------

def _drop(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _drop(v) for k, v in obj.items() if k not in NOT_RESULTS}
    if isinstance(obj, list):
        return [_drop(v) for v in obj]
    return obj


def _content(path: Path, run: Path) -> object:
    """What a final file says, with durations left out and the run's own path written as <RUN>."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files if k not in NOT_RESULTS}
    if path.suffix == ".safetensors":
        return path.read_bytes()
    text = path.read_text().replace(str(run), "<RUN>")
    if path.suffix == ".json":
        return json.dumps(_drop(json.loads(text)), sort_keys=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k: v for k, v in r.items() if k not in NOT_RESULTS} for r in rows]


def _outputs(run: Path) -> dict[str, Path]:
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*"))
            if p.suffix in (".npz", ".csv", ".json", ".safetensors") and p.name not in NOT_OUTPUTS
            and "checkpoints" not in p.parts}


def assert_same_outputs(whole: Path, resumed: Path) -> None:
    expected, got = _outputs(whole), _outputs(resumed)
    assert expected, f"no outputs in {whole}"
    missing = sorted(set(expected) - set(got))
    assert not missing, f"the resumed run lacks {missing}"
    for name, path in expected.items():
        a, b = _content(path, whole), _content(got[name], resumed)
        if isinstance(a, dict) and path.suffix == ".npz":
            assert a.keys() == b.keys(), name
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
        else:
            assert a == b, name
    assert not list(resumed.rglob(".*.tmp-*")), "a writer's temporary file was left behind"


# ---- the tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["information", "criticality", "guidance-pulses", "compare-processes"])
def test_killed_after_a_unit_resumes_to_identical_outputs(command, reference, tmp_path):
    run = tmp_path / "cut"
    cut = _interrupt_when([*COMMANDS[command], "--out", str(tmp_path), "--name", "cut"], run / UNIT[command],
                          signal.SIGKILL)
    _killed(cut, run)
    _resume(command, run)
    assert_same_outputs(reference(command), run)


# the first final file each writes once every unit is done (the figures, slowed, come after it)
FIRST_FINAL = {"information": "two_point.csv", "criticality": "trajectories.npz"}


@pytest.mark.parametrize("command", list(FIRST_FINAL))
def test_killed_while_writing_final_outputs_resumes_to_identical_outputs(command, reference, tmp_path):
    run = tmp_path / "cut"
    cut = _interrupt_when([*COMMANDS[command], "--out", str(tmp_path), "--name", "cut"], run / FIRST_FINAL[command],
                          signal.SIGKILL, slow_figures=True)
    _killed(cut, run)
    _resume(command, run)
    assert_same_outputs(reference(command), run)


def test_calibrate_held_interrupted_and_killed_while_finishing(reference, tmp_path, capsys):
    """Stopped after a step, the run is held: a second process is refused by the lock; then Ctrl-C stops it with
    the resume command printed; a resume killed (-9) once the first final file exists; a last resume ends
    identical to an uninterrupted run."""
    run, argv = tmp_path / "cut", [*COMMANDS["calibrate"], "--out", str(tmp_path), "--name", "cut"]
    first = _start(argv)
    _wait_for(first, run / UNIT["calibrate"])
    first.send_signal(signal.SIGSTOP)
    try:
        assert main(["calibrate", "--resume", str(run), "--no-progress"]) == 2
        assert "being worked on by process" in capsys.readouterr().err
        first.send_signal(signal.SIGINT)                   # delivered when it runs again
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert f"resume with  scorefield calibrate --resume {run}" in err and "Traceback" not in err
    assert not (run / "summary.json").exists() and len(list((run / "steps").glob("step-*.npz"))) < 6, \
        "the run went past the step it was stopped at"
    _killed(_interrupt_when(["calibrate", "--resume", str(run), "--no-progress"], run / "calibration.npz",
                            signal.SIGKILL, slow_figures=True), run)
    _resume("calibrate", run)
    assert_same_outputs(reference("calibrate"), run)


def test_predict_killed_while_calibrating_interrupted_at_a_theory_and_killed_while_finishing(reference, tmp_path):
    """kill -9 during the calibration that predict runs first (a calibration step is the unit); resuming that
    run finishes it and predicts; Ctrl-C after the network's samples prints the prediction run's resume command;
    kill -9 once the first final table exists; the last resume ends identical to an uninterrupted run."""
    run, cal = tmp_path / "cut", tmp_path / "cut-calibration"
    killed = _interrupt_when([*COMMANDS["predict"], "--out", str(tmp_path), "--name", "cut"],
                             cal / "steps/step-001.npz", signal.SIGKILL)
    _killed(killed, cal)
    assert not run.exists()
    stopped = _interrupt_when(["predict", "--resume", str(cal), "--no-progress"], run / "samples/network.npz",
                              signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert f"resume with  scorefield predict --resume {run}" in stopped.stderr
    assert "Traceback" not in stopped.stderr and (cal / "summary.json").exists()
    _killed(_interrupt_when(["predict", "--resume", str(run), "--no-progress"], run / "agreement.csv",
                            signal.SIGKILL, slow_figures=True), run)
    _resume("predict", run)
    whole = reference("predict")
    assert_same_outputs(whole, run)
    assert_same_outputs(whole.parent / "whole-calibration", cal)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_resume_with_changed_options_is_refused_with_the_differences(command, reference, capsys):
    whole = reference(command)
    before = (whole / "summary.json").read_bytes()
    flags, listed = CHANGED[command]
    assert _main([command, "--resume", str(whole), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and listed in err, err
    assert (whole / "summary.json").read_bytes() == before


def test_a_run_is_resumed_only_by_the_command_that_made_it(reference, capsys):
    whole = reference("calibrate")
    assert _main(["information", "--resume", str(whole), "--no-progress"]) == 2
    assert f"resume it with  scorefield calibrate --resume {whole}" in capsys.readouterr().err


def test_the_resume_hint_names_the_experiment_not_a_run_inside_it(tmp_path):
    from scorefield.commands._resume import resume_target

    experiment, cal, pred = tmp_path / "pulses", tmp_path / "p-calibration", tmp_path / "p"
    assert resume_target([experiment, experiment / "classifier", experiment / "network"]) == experiment
    assert resume_target([cal]) == cal and resume_target([cal, pred]) == pred    # predict calibrates first
    assert resume_target([]) is None


PAPER_RUN = ["paper-run", "mnist-resnet-zeros", "--subset", "16", "--train-steps", "2", "--batch-size", "4",
             "--width", "8", "--seeds", "2", "--cal-seeds", "2", "--sizes", "3,5", "--sampler-steps", "4",
             "--no-progress"]


def test_paper_run_killed_while_calibrating_resumes_to_identical_outputs(tmp_path, one_thread):
    """kill -9 of `scorefield paper-run` once its network is trained and a calibration step is saved; the resume
    keeps the trained network and the step, and ends with the outputs of an uninterrupted run."""
    assert _main([*PAPER_RUN, "--out", str(tmp_path), "--name", "whole"]) == 0
    run = tmp_path / "cut"
    cut = _interrupt_when([*PAPER_RUN, "--out", str(tmp_path), "--name", "cut"],
                          run / "calibrate" / "steps" / "step-001.npz", signal.SIGKILL)
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    assert not (run / "paper_comparison.csv").exists()
    weights = (run / "train" / "model.safetensors").stat().st_mtime_ns
    assert _main(["paper-run", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "train" / "model.safetensors").stat().st_mtime_ns == weights        # not trained again
    assert_same_outputs(tmp_path / "whole", run)
