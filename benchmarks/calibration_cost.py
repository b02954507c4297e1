"""Cost of calibrating many patch sizes against the cost of one machine evaluation at one size.

Calibration (kamb-ganguli App. C.2, `sf.experiments.calibrate`) evaluates the machine at every candidate size
on the network's states at every step. This measures, on the same noisy inputs (real MNIST digits noised to
several ᾱ, the bank a subset of MNIST training images), the time of the per-step work of calibration over the
candidate sizes, and the time of one evaluation at each single size, and prints their ratios.

    .venv/bin/python benchmarks/calibration_cost.py                      # bbELS and ELS, 1,000 images, 3…27
    .venv/bin/python benchmarks/calibration_cost.py --quick              # smoke run

Writes benchmarks/out/calibration_cost.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

import scorefield as sf
from scorefield.experiments.calibration import cosine_per_sample

OUT = Path(__file__).resolve().parent / "out"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def measure(machines: dict, x: torch.Tensor, ab: torch.Tensor, repeats: int) -> tuple[dict[int, float], float]:
    """(seconds of one evaluation per size, seconds of one calibration step over all sizes)."""
    for m in machines.values():
        m(x, ab)                                                  # build / cache each bank once, untimed
    single = {p: timed(lambda m=m: m(x, ab), repeats) for p, m in machines.items()}
    ref = next(iter(machines.values()))(x, ab)

    def calibrate_step() -> None:
        for m in machines.values():
            cosine_per_sample(m(x, ab), ref)
    return single, timed(calibrate_step, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sizes", default="3:27")
    ap.add_argument("--machines", default="bbels,els")
    ap.add_argument("--alpha-bars", default="0.1,0.5,0.9")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.bank, args.samples, args.sizes, args.alpha_bars, args.repeats = 100, 2, "3:7", "0.5", 1
    lo, hi = (int(v) for v in args.sizes.split(":"))
    sizes = list(range(lo, hi + 1, 2))
    data = sf.data.load("mnist", subset=args.bank, seed=0)
    clean = sf.data.load("mnist", split="test", subset=args.samples, seed=1).images
    rows = []
    for name in args.machines.split(","):
        padding = "circular" if name == "els" else "zeros"
        machines = {p: sf.models.make(name, data, patch_size=p, padding=padding) for p in sizes}
        for ab_value in [float(v) for v in args.alpha_bars.split(",")]:
            ab = torch.full((args.samples,), ab_value)
            x = ab.sqrt()[:, None, None, None] * clean + (1 - ab).sqrt()[:, None, None, None] * torch.randn_like(clean)
            single, total = measure(machines, x, ab, args.repeats)
            rows.append({"machine": name, "alpha_bar": ab_value, "sizes": f"{lo}…{hi} ({len(sizes)})",
                         "all_sizes_s": round(total, 3), "P3_s": round(single[sizes[0]], 3),
                         "P15_s": round(single.get(15, float("nan")), 3), "Pmax_s": round(single[sizes[-1]], 3),
                         "ratio_vs_P3": round(total / single[sizes[0]], 1),
                         "ratio_vs_P15": round(total / single.get(15, float("nan")), 1),
                         "ratio_vs_Pmax": round(total / single[sizes[-1]], 2)})
            print(rows[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    cols = list(rows[0])
    with open(OUT / "calibration_cost.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    head = (f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; bank {args.bank} MNIST images; "
            f"{args.samples} samples per evaluation\n\n")
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join(
        "| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows)
    (OUT / "calibration_cost.md").write_text(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
