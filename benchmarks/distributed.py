"""Scale-out: the speed-up from 1 to 2 processes on this machine (bank split and seed split), and a projection of
the CIFAR-10 paper configuration on 8 GPUs.

Measured: bbELS (the calibrated MNIST schedule of the bundled network, 3×7, 5×5, 7×4, 9×4 from the lowest noise)
on MNIST training images, a few samples, DDIM; each configuration in its own processes, timing the sampling only
(after data loading, model building and the process group's start):

    1 process × 1 thread | 1 process × 2 threads | 2 ranks × 1 thread, bank split | 2 ranks × 1 thread, seed split

and the largest difference of each run's samples from the 1-process samples (bank split: float rounding; seed
split: none where the per-sample computation does not depend on the batch). Pairs are (query pixel, bank patch)
pairs folded, summed over ranks, from the engine log.

Projected (stated as a projection, not measured): the CIFAR-10 configuration of the paper — 50,000 training images
of 32×32×3 as one bank (the class-conditional machine uses 5,000 per class: 10× less work), 100 seeds × 20 DDIM
steps, bbELS at a calibrated schedule (`--cifar-schedule`, default the MNIST one above) — from its operation count:
the pairs of every step (`gpu_engine.pairs_per_sample` on 32×32) and their GEMM flops 2·(3P²+1), on one core at the
rate measured here (flops per second of the 1-process, 1-thread run), and on 8 GPUs at the peak rates of
`gpu_engine.py` (compute-bound: the larger of flops / FP32 peak and pairs / exp rate; the pure-torch route that
the GEMM path takes on CUDA: 16 bytes per pair through HBM), divided over 8 ranks: the seed split deals
⌈100/8⌉ = 13 seeds to the busiest rank; the bank split divides every step by 8 and adds the merge, two
all-reduces of a float64 state of (1 + C) numbers per query pixel per step (at NVLink's ≈ 450 GB/s per direction).

    .venv/bin/python benchmarks/distributed.py                                   # 1,000 images, 4 samples, 20 steps
    .venv/bin/python benchmarks/distributed.py --images 200 --samples 2 --steps 6   # a quick run

Other jobs may share the CPU while it runs: the table states the machine's load. Writes benchmarks/out/distributed.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SCHEDULE = [3] * 7 + [5] * 5 + [7] * 4 + [9] * 4          # lowest noise first (the bundled network's calibration)
NVLINK_BYTES_PER_S = 450e9
CIFAR = {"images": 50_000, "channels": 3, "size": 32, "seeds": 100, "ranks": 8}


def _schedule(steps: int) -> list[int]:
    """`steps` sizes (lowest noise first) read off SCHEDULE at evenly spaced places."""
    return [SCHEDULE[min(len(SCHEDULE) - 1, int(i * len(SCHEDULE) / steps))] for i in range(steps)]


# ---- one measured configuration (run in its own processes) ------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch

    import scorefield as sf
    from scorefield import distributed

    torch.set_num_threads(args.threads)
    distributed.init()
    data = sf.data.load("mnist", split="train", subset=args.images, seed=0)
    schedule = sf.models.machines.calibrated_patch_schedule(_schedule(args.steps))
    model = sf.models.make("bbels", data, patch_size=schedule)
    if args.worker == "bank":
        distributed.shard_bank(model)
    seeds = list(range(args.samples))
    mine = distributed.split_positions(len(seeds)) if args.worker == "seeds" else seeds
    noise = sf.sampling.initial_noise(len(seeds), (1, 28, 28), seeds=seeds)[mine]
    distributed.barrier()
    tic = time.perf_counter()
    out = sf.sampling.sample(model, noise, steps=args.steps, seeds=[seeds[i] for i in mine])
    if args.worker == "seeds":
        out = distributed.gather_in_order(out)
    distributed.barrier()
    seconds = time.perf_counter() - tic
    log = model.engine_log()
    folded = [(e["patch_size"], e["pairs_evaluated"]) for e in log]
    everyone = distributed.gather_objects(folded)
    if distributed.is_writer():
        pairs = sum(p for rank in everyone for _, p in rank)
        flops = sum(2 * (size * size + 1) * p for rank in everyone for size, p in rank)
        torch.save(out, args.save)
        print("RESULT " + json.dumps({"seconds": seconds, "pairs": pairs, "flops": flops}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, threads: int, ranks: int, args: argparse.Namespace, save: Path) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", mode, "--threads", str(threads), "--images",
              str(args.images), "--samples", str(args.samples), "--steps", str(args.steps), "--save", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(_free_port()), *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- the projection --------------------------------------------------------------------------------------------

def cifar_projection(schedule: list[int], core_flops_per_s: float) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from gpu_engine import LOGIT_BYTES_PER_PAIR, PEAK, pairs_per_sample

    c, size, n, seeds, ranks = (CIFAR[k] for k in ("channels", "size", "images", "seeds", "ranks"))
    per_seed_pairs = [pairs_per_sample(p, n, size, size) for p in schedule]
    pairs = sum(per_seed_pairs) * seeds
    flops = sum(q * 2 * (c * p * p + 1) for q, p in zip(per_seed_pairs, schedule, strict=True)) * seeds
    busiest = math.ceil(seeds / ranks) / seeds                       # the seed split's busiest rank
    merge_bytes = 2 * 8 * (1 + c) * size * size * seeds * len(schedule)   # two all-reduces per step
    merge_s = 2 * merge_bytes / NVLINK_BYTES_PER_S                   # a ring all-reduce sends each byte about twice
    rows = [{"where": "1 CPU core of this machine (measured rate)", "pairs": pairs, "pflop": flops / 1e15,
             "one_device_s": flops / core_flops_per_s, "seed_split_s": None, "bank_split_s": None}]
    for gpu, peak in PEAK.items():
        for route, seconds in (("compute-bound", max(flops / peak["fp32_flops"], pairs / peak["exp_per_s"])),
                               ("pure-torch route, memory-bound", pairs * LOGIT_BYTES_PER_PAIR / peak["bytes_per_s"])):
            rows.append({"where": f"{ranks} × {gpu}, {route}", "pairs": pairs, "pflop": flops / 1e15,
                         "one_device_s": seconds, "seed_split_s": seconds * busiest,
                         "bank_split_s": seconds / ranks + merge_s})
    return rows


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cifar-schedule", default=",".join(map(str, SCHEDULE)),
                        help="the CIFAR-10 patch sizes per step, lowest noise first (default the MNIST schedule)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    folder = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    runs = [("1 process × 1 thread", "single", 1, 1), ("1 process × 2 threads", "single", 2, 1),
            ("2 ranks × 1 thread, bank split", "bank", 1, 2), ("2 ranks × 1 thread, seed split", "seeds", 1, 2)]
    load = os.getloadavg()[0]
    results = []
    for label, mode, threads, ranks in runs:
        result = measure(mode, threads, ranks, args, folder / f"{mode}-{threads}.pt")
        result.update(label=label, samples=torch.load(folder / f"{mode}-{threads}.pt"))
        results.append(result)
        print(f"{label}: {result['seconds']:.1f} s", flush=True)
    base = results[0]
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    lines = [f"# Scale-out on {os.cpu_count()} cores ({cpu}): bbELS, {args.images} MNIST images, {args.samples} "
             f"samples, {args.steps} DDIM steps", "",
             f"Load average before the runs: {load:.1f} (other jobs shared the CPU). Times are the sampling only.", "",
             "| configuration | seconds | speed-up vs 1×1 | speed-up vs 1×2 | pairs folded | Mpairs/s | "
             "max diff vs 1×1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        diff = float((r["samples"] - base["samples"]).abs().max())
        lines.append(f"| {r['label']} | {r['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f} | "
                     f"{results[1]['seconds'] / r['seconds']:.2f} | {r['pairs']:.3e} | "
                     f"{r['pairs'] / r['seconds'] / 1e6:.1f} | {diff:.1e} |")
    schedule = [int(v) for v in args.cifar_schedule.split(",")]
    core_rate = base["flops"] / base["seconds"]
    lines += ["", f"## Projection (not measured): CIFAR-10, {CIFAR['images']} images of 32×32×3 as one bank, "
              f"{CIFAR['seeds']} seeds × {len(schedule)} steps, bbELS at {schedule}", "",
              f"One core's measured rate here: {core_rate / 1e9:.2f} GFLOP/s of fold GEMM "
              f"({base['pairs'] / base['seconds'] / 1e6:.1f} Mpairs/s at MNIST's D = P²). GPU rows: the peak rates "
              f"of benchmarks/gpu_engine.py; seed split: the busiest of {CIFAR['ranks']} ranks holds "
              f"{math.ceil(CIFAR['seeds'] / CIFAR['ranks'])} seeds; bank split: 1/{CIFAR['ranks']} of every step "
              "plus its all-reduces over NVLink.", "",
              "| where | pairs | PFLOP | 1 core / 1 GPU | seed split | bank split |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['where']} | {r['pairs']:.2e} | {r['pflop']:.1f} | {_fmt_s(r['one_device_s'])} | "
              f"{_fmt_s(r['seed_split_s'])} | {_fmt_s(r['bank_split_s'])} |"
              for r in cifar_projection(schedule, core_rate)]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed.md").write_text(text)


if __name__ == "__main__":
    main()
