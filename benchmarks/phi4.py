"""The φ⁴ sampler's acceptance, integrated autocorrelation times and throughput (scorefield.data.phi4).

For 6×6 (the RG slides' lattice) and 32×32, HMC and Metropolis, at three points of S = Σ[½(∂φ)² + ½m²φ² +
(λ/4!)φ⁴]: the free theory (m² = 1, λ = 0), the interacting symmetric phase (m² = 0.5, λ = 3) and near the
critical point (m² = −0.72, λ = 3: the Binder cumulants of L = 16 and 32 cross there, measured with this
sampler). Each row is one `sample_phi4` call with the library's defaults (tuning, automatic thermalization,
thinning by ⌈2 τ_max⌉): τ_int (Sokal windowing, pilot run, in trajectories or sweeps) of M, |M| and S,
acceptance, thin, and samples/s both per wall-clock and per CPU second of this process (the machines are
shared; the CPU figure is the stable one). One thread, as the tests run.

    .venv/bin/python benchmarks/phi4.py            # full table (several minutes)
    .venv/bin/python benchmarks/phi4.py --quick    # smoke run (seconds)

Writes benchmarks/out/phi4.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from scorefield.data import phi4

OUT = Path(__file__).resolve().parent / "out"
POINTS = [("free", 1.0, 0.0), ("symmetric", 0.5, 3.0), ("near-critical", -0.72, 3.0)]
SIZES = {6: 10_000, 32: 1000}  # lattice size → samples per row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(size: int, mass2: float, coupling: float, method: str, n: int) -> dict[str, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = phi4.sample_phi4(size=size, mass2=mass2, coupling=coupling, n=n, seed=0, method=method)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    d = run.diagnostics
    pilot = d["tau_int_pilot"]

    def tau(name: str) -> str:
        t = pilot[name]
        return f"{t['tau']:.2f} ± {t['error']:.2f}" + ("" if t["converged"] else " (>, window not converged)")

    return {"size": size, "mass2": mass2, "coupling": coupling, "method": method, "n": n, "chains": d["chains"],
            "acceptance": round(d["acceptance"], 3),
            "step": round(d.get("step_size", d.get("proposal_width")), 3),
            "leapfrog_steps": round(d["leapfrog_steps_mean"], 2) if method == "hmc" else "",
            "tau_M": tau("magnetization"), "tau_absM": tau("abs_magnetization"), "tau_S": tau("action"),
            "thermalization": d["tune"] + d["thermalization"], "thin": d["thin"],
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "samples_per_s_wall": round(n / wall, 1), "samples_per_s_cpu": round(n / cpu, 1),
            "warning": "; ".join(str(w.message).split(" (")[0] for w in caught)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny n, 6×6 only (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {6: 200} if args.quick else SIZES
    rows = []
    for size, n in sizes.items():
        for label, mass2, coupling in POINTS:
            for method in phi4.METHODS:
                row = {"point": label, **measure(size, mass2, coupling, method, n)}
                rows.append(row)
                print(" | ".join(str(v) for v in row.values()), flush=True)
    OUT.mkdir(exist_ok=True)
    name = "phi4-quick" if args.quick else "phi4"
    with open(OUT / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = ["lattice", "point (m², λ)", "method", "chains", "acc", "step", "τ_M", "τ_|M|", "τ_S", "therm",
              "thin", "samples/s (CPU)", "samples/s (wall)"]
    lines = [f"CPU: {cpu_model()}, torch {torch.__version__}, 1 thread, load average "
             f"{os.getloadavg()[0]:.1f} at the end. τ in trajectories (HMC, length 1) or sweeps (Metropolis); "
             "therm = tuning + pilot; samples are thinned by ⌈2 τ_max⌉.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['size']}×{r['size']} | {r['point']} ({r['mass2']:g}, {r['coupling']:g}) | {r['method']} | "
                     f"{r['chains']} | {r['acceptance']} | {r['step']} | {r['tau_M']} | {r['tau_absM']} | "
                     f"{r['tau_S']} | {r['thermalization']} | {r['thin']} | {r['samples_per_s_cpu']} | "
                     f"{r['samples_per_s_wall']} |")
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
