"""`compare-processes` and `guidance-pulses` under torchrun with 2 gloo CPU ranks.

Their units of work (compare-processes: a (dataset, process, seed) training + sampling; guidance-pulses: a
calibration class and a (class, condition) sample set) are dealt to the ranks, and the run directory must hold the
very files of a one-process run (bitwise: one thread per rank), durations aside; a rank killed with `kill -9`
after a finished round must leave a run that the relaunched job completes to the same files, keeping the saved
units as they are. `--shard bank` is refused by both with one line naming it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as tdist

from scorefield import distributed
from scorefield.cli import main
from scorefield.commands._distributed import SPLIT_COMMANDS
from test_distributed import _finish, _kill_rank_when, _one_process, _torchrun
from test_kill_resume_analyses import assert_same_outputs

pytestmark = pytest.mark.skipif(not tdist.is_available(), reason="this torch build has no torch.distributed")

# 3 seeds × 2 processes = 6 units: 3 rounds of 2 ranks
COMPARE = ["compare-processes", "--datasets", "grf", "--processes", "standard,matched", "--n-train", "32",
           "--n-test", "32", "--n-samples", "16", "--steps", "3", "--arch", "convnet", "--preset", "tiny",
           "--sample-steps", "3", "--seeds", "3", "--no-progress"]
# both arms, σ_c measured (the calibration classes are dealt too), 2 classes × 3 conditions per arm
PULSES = ["guidance-pulses", "--arms", "network,machine", "--network-steps", "2", "--network-opt", "batch_size=8",
          "--subset", "200", "--classes", "0,1", "--n", "2", "--machine-n", "2", "--n-calibration", "1", "--steps",
          "5", "--bank-per-class", "3", "--classifier-epochs", "1", "--classifier-train", "100", "--classifier-eval",
          "100", "--bootstrap", "20", "--no-progress"]


@pytest.fixture(scope="module")
def compare_reference(tmp_path_factory) -> Path:
    """The one-process compare-processes run (one thread), made once for the tests below."""
    root = tmp_path_factory.mktemp("compare-one")
    _one_process([*COMPARE, "--out", str(root), "--name", "one"])
    return root / "one"


def test_both_commands_split_and_refuse_the_bank_split(capsys):
    assert {"compare-processes", "guidance-pulses"} <= set(SPLIT_COMMANDS)
    for argv in (COMPARE, PULSES):
        assert main([*argv, "--shard", "bank"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--shard bank does not apply" in err and len(err.splitlines()) == 1, err


def test_the_collective_timeout_outlasts_a_unit_and_comes_from_the_environment(monkeypatch):
    """A rank waits in a collective while another trains a whole unit: hours, not torch's 30 minutes."""
    monkeypatch.delenv(distributed.TIMEOUT_VARIABLE, raising=False)
    assert distributed.collective_timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S >= 3600
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "90")
    assert distributed.collective_timeout().total_seconds() == 90
    for bad in ("0", "soon", "inf", "-5"):
        monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, bad)
        with pytest.raises(distributed.DistributedError, match=distributed.TIMEOUT_VARIABLE):
            distributed.collective_timeout()


def test_compare_processes_seed_split_matches_one_process(compare_reference, tmp_path):
    out = _finish(_torchrun([*COMPARE, "--out", str(tmp_path), "--name", "two"]))
    assert out.count("run directory:") == 1                                  # rank 0 reports, alone
    assert_same_outputs(compare_reference, tmp_path / "two")
    assert [p.name for p in tmp_path.iterdir()] == ["two"]                   # one run directory
    assert len(list((tmp_path / "two" / "train").iterdir())) == 6            # each unit trained once


def test_compare_processes_killed_rank_resumes_to_the_one_process_files(compare_reference, tmp_path):
    """Rank 1 killed (-9) once the first round's two units are saved: the relaunched job keeps the saved results
    as they are, computes the rest and ends with the one-process files."""
    run, results = tmp_path / "killed", tmp_path / "killed" / "results"
    _kill_rank_when(_torchrun([*COMPARE, "--out", str(tmp_path), "--name", "killed"]), results / "grf-matched.json",
                    run)
    kept = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    assert 4 <= len(kept) < 12                                               # .json + .npz per saved unit
    out = _finish(_torchrun([COMPARE[0], "--resume", str(run), "--no-progress"]))
    assert out.count("run directory:") == 1
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.name in kept} == kept
    assert len(list(results.iterdir())) == 12
    assert_same_outputs(compare_reference, run)


def test_guidance_pulses_seed_split_matches_one_process(tmp_path):
    """Classifier and network trained once on rank 0 (the network handed to rank 1), calibration classes and
    sample units dealt: the same σ_c, samples, tables and summary as one process."""
    _one_process([*PULSES, "--out", str(tmp_path), "--name", "one"])
    out = _finish(_torchrun([*PULSES, "--out", str(tmp_path), "--name", "two"]))
    assert out.count("run directory:") == 1
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
