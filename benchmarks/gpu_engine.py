"""The engine at paper scale on one GPU: full-data MNIST (50,000 images) bbELS, 100 samples, 20 DDIM steps,
the calibrated patch schedule of the bundled network (3×7, 5×5, 7×4, 9×4 listed from the lowest noise).

On a CUDA machine it runs the job (`--run`) and times it. On any machine it prints the projection from the
operation count: the (query pixel, bank patch) pairs every step folds — each query pixel meets the N·|class|
patches of its border class (kamb-ganguli eq. 41) — their GEMM flops 2·(D+1) per pair and one exp per pair,
against the device's peak rates; and, since the pure-torch fold on CUDA writes and reads each [queries × keys]
logit tile through memory, the memory-bound rate of that route too. The flat first steps (pure noise, where
the engine returns the prior mean without folding) and the deduplication of identical MNIST patches are left
out, so the projection is an upper bound on the work.

    .venv/bin/python benchmarks/gpu_engine.py                       # projection only (any machine)
    .venv/bin/python benchmarks/gpu_engine.py --run                 # on CUDA: run and time it
    .venv/bin/python benchmarks/gpu_engine.py --run --images 5000 --samples 10    # a shorter measured run
    .venv/bin/python benchmarks/gpu_engine.py --run --device cpu --images 200 --samples 2   # CPU smoke run

Writes benchmarks/out/gpu_engine.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import scorefield as sf
from scorefield.engine.geometry import group_layout

OUT = Path(__file__).resolve().parent / "out"
SCHEDULE = [3] * 7 + [5] * 5 + [7] * 4 + [9] * 4          # lowest noise first (README: the calibrated schedule)
# Peak rates of one H100 SXM / H200 (same compute die): FP32 non-tensor FLOP/s (torch's default matmul does
# not use TF32), special-function (exp) throughput = 16 SFU lanes × 132 SMs × 1.98 GHz, HBM bandwidth.
PEAK = {"H100 SXM": {"fp32_flops": 67e12, "exp_per_s": 4.2e12, "bytes_per_s": 3.35e12},
        "H200": {"fp32_flops": 67e12, "exp_per_s": 4.2e12, "bytes_per_s": 4.8e12}}
LOGIT_BYTES_PER_PAIR = 16     # the reference fold writes the logit tile, reads it for the max, the exp, the sum


def pairs_per_sample(patch_size: int, images: int, height: int = 28, width: int = 28) -> int:
    """(query pixel, key patch) pairs of one bbELS evaluation of one sample: Σ_classes |class|²·N."""
    total = 0
    for gb in group_layout("border", height, width, patch_size):
        total += gb.groups * gb.query_locs.shape[1] * gb.key_locs.shape[1]
    return total * images


def projection(images: int, samples: int, steps: list[int]) -> list[dict]:
    pairs = sum(pairs_per_sample(p, images) for p in steps) * samples
    flops = sum(pairs_per_sample(p, images) * 2 * (p * p + 1) for p in steps) * samples
    rows = []
    for gpu, peak in PEAK.items():
        compute = max(flops / peak["fp32_flops"], pairs / peak["exp_per_s"])
        memory = pairs * LOGIT_BYTES_PER_PAIR / peak["bytes_per_s"]
        rows.append({"gpu": gpu, "pairs": pairs, "gflop": flops / 1e9, "compute_bound_s": compute,
                     "reference_route_memory_bound_s": memory})
    return rows


def measured_run(images: int, samples: int, device: str) -> dict:
    data = sf.data.load("mnist", split="train", subset=images, seed=0)
    schedule = sf.models.machines.calibrated_patch_schedule(SCHEDULE)
    model = sf.models.make("bbels", data, patch_size=schedule, device=device)
    noise = sf.sampling.initial_noise(samples, (1, 28, 28), seed=0).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    tic = time.perf_counter()
    out = sf.sampling.sample(model, noise, steps=len(SCHEDULE), progress=True)
    sync()
    seconds = time.perf_counter() - tic
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({device})"
    routes = sorted({f"{e['cross_term']}/{e['fold']}/{e['device']}" for e in model.engine_log()})
    return {"images": images, "samples": samples, "seconds": seconds, "finite": bool(torch.isfinite(out).all()),
            "device": name, "routes": routes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--run", action="store_true", help="run and time the job")
    parser.add_argument("--device", default="cuda", help="device of the measured run (default cuda)")
    args = parser.parse_args()
    rows = projection(args.images, args.samples, SCHEDULE)
    lines = [f"# bbELS, {args.images} MNIST images, {args.samples} samples, {len(SCHEDULE)} steps "
             f"(schedule {SCHEDULE})", "",
             "| GPU | pairs | GFLOP | compute-bound (s) | reference route, memory-bound (s) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['gpu']} | {r['pairs']:.3e} | {r['gflop']:.0f} | {r['compute_bound_s']:.1f} | "
              f"{r['reference_route_memory_bound_s']:.1f} |" for r in rows]
    if args.run:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--run on cuda needs a CUDA device; without one this script prints the projection")
        run = measured_run(args.images, args.samples, args.device)
        lines += ["", f"Measured on {run['device']}: {run['images']} images, {run['samples']} samples: "
                      f"{run['seconds']:.1f} s (finite: {run['finite']}; routes {', '.join(run['routes'])})"]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu_engine.md").write_text(text)


if __name__ == "__main__":
    main()
