"""Scale-out with real processes: 2 CPU ranks over gloo.

The bank split must equal the single-process posterior to float rounding (IS, ES, LS, ELS, bbELS; float64
exactly); the seed split must write the very files of a one-process run (bitwise: one thread per rank); a rank
killed with `kill -9` must leave a run that the relaunched job resumes, keeping every finished batch."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist

import scorefield as sf
from scorefield import distributed
from scorefield.cli import main
from scorefield.engine.softmax import SoftmaxState

pytestmark = pytest.mark.skipif(not tdist.is_available(), reason="this torch build has no torch.distributed")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SCOREFIELD = str(Path(sys.executable).with_name("scorefield"))
SAMPLE = ["sample", "--model", "bbels", "--patch", "3", "--data", "digits", "--subset", "40", "--steps", "4",
          "--no-progress"]
BANK_CASES = [("is", {}), ("es", {}), ("ls", {"patch_size": 3}), ("els", {"patch_size": 5, "cross_term": "gemm"}),
              ("bbels", {"patch_size": 3}), ("els", {"patch_size": 3, "dtype": "float64"}),
              ("bbels", {"patch_size": 5, "dtype": "float64"}), ("is", {"dtype": "float64"})]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(_free_port()), "--no-python", SCOREFIELD, "--", *argv],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_process(argv: list[str]) -> None:
    """The command in this process on one thread, as each torchrun rank runs (so results compare bitwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


# ---- without a process group ---------------------------------------------------------------------------------

def _kill_rank_when(proc: subprocess.Popen, ready: Path, run: Path, rank: int = 1) -> None:
    """kill -9 one rank of a torchrun job once `ready` exists; the job must then fail before finishing `run`."""
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before {ready.name} appeared"
        time.sleep(0.01)
    pid = _rank_pid(proc.pid, rank)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (run / "summary.json").exists()


def test_split_positions_contiguous_strided_and_refusals():
    assert [distributed.split_positions(7, "contiguous", r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [distributed.split_positions(7, "strided", r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.split_positions(5) == [0, 1, 2, 3, 4]            # one process: everything
    with pytest.raises(distributed.DistributedError, match="3 seeds cannot be split over 4 ranks"):
        distributed.split_positions(3, "contiguous", 0, 4)
    with pytest.raises(distributed.DistributedError, match="split must be one of"):
        distributed.split_positions(3, "blocks", 0, 1)


def test_bank_split_needs_a_process_group(capsys):
    data = sf.data.ImageSet(torch.zeros(4, 1, 8, 8), name="zeros")
    with pytest.raises(distributed.DistributedError, match="needs a torch.distributed process group"):
        distributed.shard_bank(sf.models.make("els", data, patch_size=3))
    with pytest.raises(distributed.DistributedError, match="applies to the machines"):
        distributed.shard_bank(sf.models.make("tanh", data))
    assert main(["sample", "--shard", "bank", "--n", "1", "--steps", "1", "--no-progress"]) == 2
    assert "needs a torch.distributed process group" in capsys.readouterr().err


# ---- the bank split: 2 spawned ranks ---------------------------------------------------------------------------

def _bank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("gloo")
    gen = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(11, 1, 8, 8, generator=gen) * 2 - 1, name="random")   # 6 + 5 images
    x = torch.randn(3, 1, 8, 8, generator=gen)
    # mid and low noise (the float32 top-k correction matters at 0.995), and pure noise (the flat prior mean)
    calls = [(x, torch.tensor([0.2, 0.7, 0.995])), (x, torch.zeros(3))]
    errors = {}
    for name, opts in BANK_CASES:
        whole = sf.models.make(name, data, **opts)
        split = distributed.shard_bank(sf.models.make(name, data, **opts))
        key = f"{name}-{opts.get('dtype', 'float32')}"
        errors[key] = max(float((split(xi, ab) - whole(xi, ab)).abs().max()) for xi, ab in calls)
    state = SoftmaxState(torch.tensor([[1.0 + rank]], dtype=torch.float64),
                         torch.tensor([[2.0]], dtype=torch.float64),
                         torch.tensor([[[3.0 * (rank + 1)]]], dtype=torch.float64))
    merged = distributed.all_reduce_state(state)
    order = distributed.gather_in_order(torch.tensor(distributed.split(list(range(5)), "strided")), "strided")
    try:
        distributed.on_writer(lambda: 1 // 0)        # an error on rank 0 is raised on every rank
        raised = False
    except ZeroDivisionError:
        raised = True
    with distributed.writer_only() as writing:
        if writing:
            with open(Path(out) / "written.txt", "a") as fh:
                fh.write(f"{rank}\n")
    assert (Path(out) / "written.txt").read_text() == "0\n"    # rank 0 wrote, and every rank waited for it
    torch.save({"errors": errors, "merged": (merged.m, merged.l, merged.acc), "raised": raised,
                "order": None if order is None else order.tolist()}, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def test_bank_split_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_bank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["errors"] == results[1]["errors"]                 # every rank holds the same answer
    assert results[0]["raised"] and results[1]["raised"]
    assert results[0]["order"] == [0, 1, 2, 3, 4] and results[1]["order"] is None
    for key, error in results[0]["errors"].items():
        assert error <= (1e-12 if key.endswith("float64") else 2e-6), (key, error)
    # states (m=1, l=2, acc=3) and (m=2, l=2, acc=6): m = 2, l = 2e^{-1} + 2, acc = 3e^{-1} + 6
    m, l, acc = results[0]["merged"]
    assert float(m) == 2.0
    assert torch.allclose(l, torch.tensor([[2 * np.exp(-1) + 2]], dtype=torch.float64))
    assert torch.allclose(acc, torch.tensor([[[3 * np.exp(-1) + 6]]], dtype=torch.float64))


# ---- the seed split and the CLI under torchrun -----------------------------------------------------------------

def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` under the agent `parent`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def test_sample_seed_split_killed_rank_resumes_to_the_one_process_files(tmp_path):
    """Batches dealt to 2 ranks, rank 1 killed with kill -9 after two batches are written, the job relaunched with
    --resume: the finished batch files are kept as they are, nothing is written twice, and the final files are
    bitwise those of one process."""
    run = tmp_path / "killed"
    argv = [*SAMPLE, "--n", "6", "--batch-size", "1", "--out", str(tmp_path)]
    _kill_rank_when(_torchrun([*argv, "--name", "killed"]), run / "batches" / "batch-0001.npz", run)
    kept = {p.name: p.stat().st_mtime_ns for p in (run / "batches").iterdir()}
    assert 2 <= len(kept) < 6
    out = _finish(_torchrun(["sample", "--resume", str(run), "--no-progress"]))
    assert out.count("run directory:") == 1                               # rank 0 reports, alone
    assert {p.name: p.stat().st_mtime_ns for p in (run / "batches").iterdir() if p.name in kept} == kept
    assert len(list((run / "batches").iterdir())) == 6
    assert not list(run.rglob(".*.tmp-*"))
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(metrics) == 6                                              # no batch written twice
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--name", "reference"]) == 0
    finally:
        torch.set_num_threads(threads)
    reference = np.load(tmp_path / "reference" / "samples.npz")
    resumed = np.load(run / "samples.npz")
    for key in reference.files:
        assert np.array_equal(reference[key], resumed[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "reference"]   # one run directory


def test_calibrate_seed_split_matches_one_process(tmp_path):
    argv = ["calibrate", "--model", "bbels", "--patch", "5", "--model-padding", "zeros", "--data", "digits",
            "--subset", "30", "--sizes", "3,5", "--seeds", "3", "--steps", "2", "--no-progress", "--out",
            str(tmp_path)]
    _one_process([*argv, "--name", "one"])
    out = _finish(_torchrun([*argv, "--name", "two"]))
    assert out.count("calibrated bbels") == 1
    one, two = (np.load(tmp_path / n / "calibration.npz") for n in ("one", "two"))
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key


@pytest.mark.slow
def test_predict_bank_split_matches_one_process(tmp_path):
    """`--shard bank` through the CLI (slow: one more torchrun start, ≈ 20 s here)."""
    argv = ["predict", "--model", "bbels", "--patch", "3", "--model-padding", "zeros", "--data", "digits",
            "--subset", "30", "--theories", "is,bbels", "--patch-sizes", "3,5", "--seeds", "2", "--steps", "2",
            "--no-progress", "--out", str(tmp_path)]
    assert main([*argv, "--name", "one"]) == 0
    out = _finish(_torchrun([*argv, "--name", "two", "--shard", "bank"]))
    assert out.count("run directory:") == 1
    for denoiser in ("network", "is", "bbels"):
        one, two = (np.load(tmp_path / n / "samples" / f"{denoiser}.npz")["samples"] for n in ("one", "two"))
        assert np.abs(one - two).max() <= 1e-5, denoiser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_information_seed_split_matches_one_process(tmp_path):
    """The parts of an information run dealt to 2 ranks: the same parts, merged trajectory and tables."""
    argv = ["information", "--model", "els", "--patch", "3", "--data", "digits", "--subset", "30", "--n", "8",
            "--part-size", "2", "--steps", "3", "--no-progress", "--out", str(tmp_path)]
    _one_process([*argv, "--name", "one"])
    out = _finish(_torchrun([*argv, "--name", "two"]))
    assert out.count("run directory:") == 1
    for name in ["trajectory.npz", *(f"parts/part-{k:03d}.npz" for k in range(4))]:
        one, two = (np.load(tmp_path / n / name) for n in ("one", "two"))
        for key in one.files:
            assert np.array_equal(one[key], two[key]), (name, key)
    assert (tmp_path / "one" / "two_point.csv").read_text() == (tmp_path / "two" / "two_point.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_criticality_seed_split_matches_one_process(tmp_path):
    argv = ["criticality", "--model", "els", "--patch", "3", "--data", "digits", "--subset", "30", "--n", "4",
            "--part-size", "1", "--steps", "8", "--softening-every", "4", "--no-progress", "--out", str(tmp_path)]
    _one_process([*argv, "--name", "one"])
    _finish(_torchrun([*argv, "--name", "two"]))
    for name in ["trajectories.npz", *(f"parts/part-{k:03d}.npz" for k in range(4))]:
        one, two = (np.load(tmp_path / n / name) for n in ("one", "two"))
        for key in set(one.files) - {"seconds", "cpu_seconds"}:
            assert np.array_equal(one[key], two[key], equal_nan=True), (name, key)     # ξ_eq is NaN off-window
    for table in ("critical_times.csv", "softening.csv"):
        assert (tmp_path / "one" / table).read_text() == (tmp_path / "two" / table).read_text(), table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
