"""Cost of calibrating many patch sizes against the cost of one machine evaluation at one size.

Calibration (kamb-ganguli App. C.2, `sf.experiments.calibrate`) evaluates the machine at every candidate size
on the network's states at every step. This measures, on the same noisy inputs (real MNIST digits noised to
several ᾱ, the bank a subset of MNIST training images), the time of one calibration step over all candidate
sizes and the time of one evaluation at single sizes, and prints their ratios. A calibration step is what
`_StepRecorder` does: the sizes the machine's one-pass route covers (`PatchMachine.denoise_sizes`, ELS with
circular padding: every size from one pass over the bank, `engine/multisize.py`) from one call, the others
one call per size, then the cosine of each. `--loop` also times the per-size loop over every size (the path
without the one-pass route).

Each time is the best of `--repeats`, as wall-clock seconds and as this process's CPU seconds (other jobs on
the machine slow the wall clock; the CPU time is the fairer measure of the work when they do).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_cost.py --machines els --alpha-bars 0.5
    .venv/bin/python benchmarks/calibration_cost.py --machines bbels,els --loop      # the per-size loop too
    .venv/bin/python benchmarks/calibration_cost.py --quick                           # smoke run

Writes benchmarks/out/calibration_cost.md and .csv (or under --out).
"""
from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import scorefield as sf
from scorefield.experiments.calibration import cosine_per_sample

OUT = Path(__file__).resolve().parent / "out"
SLOW_CALL_S = 60.0        # CPU seconds: a single evaluation this slow is timed once, its first call


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best wall-clock seconds, best process CPU seconds) of `repeats` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        tic, tic_cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - tic), min(cpu, time.process_time() - tic_cpu)
    return wall, cpu


def calibration_step(machines: dict, x: torch.Tensor, ab: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """One calibration step as `_StepRecorder` runs it; returns the sizes the one pass covered."""
    first = next(iter(machines.values()))
    outs = first.denoise_sizes(x, ab, None, list(machines)) if hasattr(first, "denoise_sizes") else {}
    covered = list(outs)
    for p, m in machines.items():
        out = outs[p] if p in outs else m(x, ab)
        cosine_per_sample(out, ref)
    return covered


def per_size_loop(machines: dict, x: torch.Tensor, ab: torch.Tensor, ref: torch.Tensor) -> None:
    for m in machines.values():
        cosine_per_sample(m(x, ab), ref)


def route_of(machine) -> str:
    engine = machine.engines.get(None)[0] if hasattr(machine, "engines") else None
    return str(engine.last_stats.get("cross_term", "?")) if engine is not None else "?"


def measure(name: str, machines: dict, singles: list[int], x: torch.Tensor, ab: torch.Tensor, repeats: int,
            loop: bool) -> dict:
    sizes = list(machines)
    single = {}
    for p in singles:
        # the first call builds and caches the bank where one is cached (untimed); a first call of over a
        # minute streams its bank (nothing cached) and is itself the measurement
        first = timed(lambda m=machines[p]: m(x, ab), 1)
        single[p] = first if first[1] > SLOW_CALL_S else timed(lambda m=machines[p]: m(x, ab), repeats)
    routes = {p: route_of(machines[p]) for p in singles}
    ref = machines[singles[0]](x, ab)
    covered = calibration_step(machines, x, ab, ref)              # warm-up (and the sizes it covers)
    step = timed(lambda: calibration_step(machines, x, ab, ref), repeats)
    first = machines[sizes[0]]
    stats = first.engines.get(None)[0].last_stats if covered else {}
    row = {"machine": name, "alpha_bar": float(ab[0]), "sizes": f"{sizes[0]}…{sizes[-1]} ({len(sizes)})",
           "one_pass_sizes": len(covered), "fraction_folded": round(float(stats.get("fraction", float("nan"))), 3),
           "step_s": round(step[0], 2), "step_cpu_s": round(step[1], 2)}
    for p in singles:
        row[f"P{p}_s"], row[f"P{p}_cpu_s"], row[f"P{p}_route"] = round(single[p][0], 2), round(single[p][1], 2), \
            routes[p]
    for p in singles:
        row[f"ratio_vs_P{p}"] = round(step[0] / single[p][0], 1)
        row[f"cpu_ratio_vs_P{p}"] = round(step[1] / single[p][1], 1)
    if loop:
        wall, cpu = timed(lambda: per_size_loop(machines, x, ab, ref), repeats)
        row["loop_s"], row["loop_cpu_s"] = round(wall, 2), round(cpu, 2)
        row["loop_over_step_cpu"] = round(cpu / step[1], 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sizes", default="3:27")
    ap.add_argument("--singles", default="3,15,27", help="the single sizes one evaluation is timed at")
    ap.add_argument("--machines", default="els")
    ap.add_argument("--alpha-bars", default="0.1,0.5,0.9")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--loop", action="store_true", help="also time the per-size loop over every size")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.quick:
        args.bank, args.samples, args.sizes, args.singles, args.alpha_bars = 100, 2, "3:7", "3,7", "0.5"
    lo, hi = (int(v) for v in args.sizes.split(":"))
    sizes = list(range(lo, hi + 1, 2))
    singles = [int(v) for v in args.singles.split(",") if int(v) in sizes]
    data = sf.data.load("mnist", subset=args.bank, seed=0)
    clean = sf.data.load("mnist", split="test", subset=args.samples, seed=1).images
    gen = torch.Generator().manual_seed(2)
    rows = []
    jobs = [(name, float(v)) for name in args.machines.split(",") for v in args.alpha_bars.split(",")]
    for name, ab_value in tqdm(jobs, desc="calibration cost", unit="case"):
        padding = "circular" if name == "els" else "zeros"
        machines = {p: sf.models.make(name, data, patch_size=p, padding=padding) for p in sizes}
        ab = torch.full((args.samples,), ab_value)
        x = ab.sqrt()[:, None, None, None] * clean + (1 - ab).sqrt()[:, None, None, None] * torch.randn(
            clean.shape, generator=gen)
        rows.append(measure(name, machines, singles, x, ab, args.repeats, args.loop))
        tqdm.write(str(rows[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(out / "calibration_cost.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    head = (f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; bank {args.bank} MNIST images; "
            f"{args.samples} samples per evaluation; sizes {sizes}\n\n")
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join(
        "| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for r in rows)
    (out / "calibration_cost.md").write_text(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
