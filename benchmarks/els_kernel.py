"""Throughput of the patch-posterior kernel against this machine's roofline.

Measures in one run: (a) the float32 matmul peak, (b) the in-cache exp rate, hence the roofline
min(peak / 2D, exp rate) pairs/s per patch dimension D = P²·C, and (c) `kernels.accumulate` (the engine's
entry point, called as the engine calls it: queries and keys augmented with the ‖k‖² column, scale 1, top-8
tracking) and the pure-torch `accumulate_reference` loop over the same chunks, in (query, key) pairs/s, as a
fraction of the roofline, with the peak resident-memory growth during the call; and (d) the box-sum kernel
(`boxkernel.box_posterior`, which the engine uses from P = 7 up: every distance a sliding box sum, O(1) per pair
whatever D, exp skipped for key groups certified below 1e-6 of a pixel's mass) on the same images, in pairs of
the raw bank per second, timed on BOX_KEY_IMAGES training images (its threads split the work by image);
"engine" is the path the engine picks by default (cross_term='auto') for these data.

Work shapes: MNIST (60,000 training images 28×28) with P in 3, 7, 15, 27 and CIFAR-10 (50,000, 32×32×3) with
P in 3, 11, every pixel a query and every circularly padded patch of every training image a key. Only a
subset of the keys (a few training images) is timed; the full-data time is extrapolated from the measured
rate (the kernel's cost is linear in the number of keys). Patch extraction is not timed.

    .venv/bin/python benchmarks/els_kernel.py            # full table (a few minutes)
    .venv/bin/python benchmarks/els_kernel.py --quick    # smoke run (seconds)

Writes benchmarks/out/els_kernel.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scorefield.engine import PatchPosterior, fastkernel, kernels
from scorefield.engine import box as boxkernel

OUT = Path(__file__).resolve().parent / "out"
TOPK = 8        # the engine tracks the top 8 keys of each query in float32
ALPHA_BAR = 0.5  # mid noise: every key carries weight (no skipping of far-below-max keys)
BOX_KEY_IMAGES = 32  # the box kernel splits its work by training image: time it on enough images for 2 threads

WORKLOADS = [  # (name, train images, channels, size, patch sizes)
    ("MNIST", 60_000, 1, 28, (3, 7, 15, 27)),
    ("CIFAR-10", 50_000, 3, 32, (3, 11)),
]


class PeakRSS:
    """Peak resident-memory growth (bytes) of this process while the block runs, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_time(fn, repeats: int, min_time: float = 0.0) -> float:
    """Best wall time of `repeats` calls (each call repeated until it lasts min_time)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return best


def matmul_peak(quick: bool) -> float:
    """float32 GEMM rate in FLOP/s (square matmul into a preallocated output)."""
    n = 1024 if quick else 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=c), 3 if quick else 5, 0.2)


def exp_rate(quick: bool) -> float:
    """torch.exp on an in-cache 256×1024 float32 tile, elements/s (inputs in [-20, 0], no denormals)."""
    x = -20 * torch.rand(256, 1024)
    y = torch.empty_like(x)
    return x.numel() / best_time(lambda: torch.exp(x, out=y), 5, 0.05 if quick else 0.2)


def patches(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular patches of every pixel: ([N·H·W, C·P²], centre pixels [N·H·W, C])."""
    n, c, h, w = images.shape
    r = patch_size // 2
    padded = F.pad(images, (r, r, r, r), mode="circular")
    cols = F.unfold(padded, patch_size)                                  # [N, C·P², H·W]
    return cols.transpose(1, 2).reshape(n * h * w, -1), images.permute(0, 2, 3, 1).reshape(n * h * w, c)


def smooth_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images in [-1, 1]: realistic patch statistics without a dataset download."""
    raw = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(F.pad(raw, (1, 1, 1, 1), mode="circular"), 3, stride=1).tanh()


def engine_inputs(channels: int, size: int, patch_size: int, n_query_images: int, n_key_images: int):
    """Queries and key chunk exactly as the engine passes them (augmented with the bias column)."""
    gen = torch.Generator().manual_seed(patch_size)
    smooth = smooth_images(n_query_images + n_key_images, channels, size, patch_size)
    a, s2 = ALPHA_BAR**0.5, 1 - ALPHA_BAR
    noisy = a * smooth[:n_query_images] + s2**0.5 * torch.randn(smooth[:n_query_images].shape, generator=gen)
    q, _ = patches(noisy, patch_size)                                   # [Q, D]
    k, v = patches(smooth[n_query_images:], patch_size)                 # [K, D], [K, C]
    q_aug = torch.cat([q * (a / s2), torch.full((q.shape[0], 1), -a * a / (2 * s2))], 1)[None]  # [1, Q, D+1]
    k_aug = torch.cat([k, (k * k).sum(1, keepdim=True)], 1)[None]                              # [1, K, D+1]
    images = (noisy, smooth[n_query_images:])
    return q_aug.contiguous(), k_aug.contiguous(), torch.zeros(1, k.shape[0]), v[None].contiguous(), images


def measure(fn, q, k, bias, v, chunk: int, repeats: int) -> tuple[float, int]:
    """(seconds per pass over all keys, peak RSS growth) for folding the keys chunk by chunk."""
    def run():
        state = kernels.init_state(q.shape[:-1], v.shape[-1], topk=TOPK)
        for start in range(0, k.shape[1], chunk):
            sl = slice(start, start + chunk)
            state = fn(state, q, k[:, sl], bias[:, sl], v[:, sl], 1.0, key_offset=start)
        return state

    with PeakRSS() as mem:
        run()
    return best_time(run, repeats), mem.growth


def box_rate(noisy: torch.Tensor, key_images: torch.Tensor, patch_size: int, repeats: int) -> dict | None:
    """Pairs of the raw bank per second of the box-sum kernel on these images, the fraction of pairs it
    exp'd, and its peak RSS growth (None where the kernel is unavailable or does not cover the shape)."""
    if not (boxkernel.available() and boxkernel.covers(tuple(key_images.shape), patch_size)):
        return None
    b, _, h, w = noisy.shape
    pairs = b * h * w * key_images.shape[0] * h * w
    result: list = []

    def run():
        result[:] = [boxkernel.box_posterior(noisy, ALPHA_BAR, key_images, patch_size, progress=False)]

    with PeakRSS() as mem:
        run()
    seconds = best_time(run, repeats)
    return {"rate": pairs / seconds, "folded": result[0].folded / pairs, "peak": mem.growth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one workload per dataset")
    parser.add_argument("--out", type=Path, default=OUT / "els_kernel")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"compiled kernel: {fastkernel.available()}; threads: {torch.get_num_threads()}; "
          f"load: {os.getloadavg()[0]:.2f}")
    peak, exps = matmul_peak(args.quick), exp_rate(args.quick)
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s, in-cache exp {exps / 1e9:.2f} G/s")
    rows = []
    for name, n_train, channels, size, sizes in WORKLOADS:
        for p in sizes[:2] if args.quick else sizes:
            n_q_img = 1 if args.quick else 2
            dim = channels * p * p
            # enough key images for ~0.1 s of fast-path work, at least one
            n_k_img = max(1, min(64, int(4e8 / (n_q_img * size * size * size * size * max(dim, 32)))))
            n_k_img = 1 if args.quick else n_k_img
            q, k, bias, v, (noisy, key_images) = engine_inputs(channels, size, p, n_q_img, n_k_img)
            chunk = max(size * size, k.shape[1] // 2)
            pairs = q.shape[1] * k.shape[1]
            reps = 1 if args.quick else 3
            t_fast, m_fast = measure(kernels.accumulate, q, k, bias, v, chunk, reps)
            t_ref, m_ref = measure(kernels.accumulate_reference, q, k, bias, v, chunk, reps)
            roof = min(peak / (2 * dim), exps)
            box_keys = smooth_images(BOX_KEY_IMAGES if not args.quick else 2, channels, size, p + 1000)
            box = box_rate(noisy, box_keys, p, reps)
            engine_box = PatchPosterior(box_keys)._uses_box(noisy, torch.full((noisy.shape[0],), ALPHA_BAR,
                                                                               dtype=torch.float64), p)
            full_pairs = n_train * size * size * 100 * size * size   # 100 samples × all pixels × whole bank
            row = {
                "data": name, "P": p, "D": dim, "queries": q.shape[1], "keys timed": k.shape[1],
                "roofline Gpairs/s": roof / 1e9,
                "fast Gpairs/s": pairs / t_fast / 1e9, "fast / roofline": pairs / t_fast / roof,
                "reference Gpairs/s": pairs / t_ref / 1e9, "speed-up": t_ref / t_fast,
                "box Gpairs/s": box["rate"] / 1e9 if box else "n/a",
                "box / roofline": box["rate"] / roof if box else "n/a",
                "box pairs exp'd": box["folded"] if box else "n/a",
                "engine path": "box" if engine_box else "gemm",
                "engine / roofline": (box["rate"] if engine_box else pairs / t_fast) / roof,
                "fast peak MiB": m_fast / 2**20, "reference peak MiB": m_ref / 2**20,
                "box peak MiB": box["peak"] / 2**20 if box else "n/a",
                "100 samples × 1 step, full data (fast), min": full_pairs / (pairs / t_fast) / 60,
                "100 samples × 1 step, full data (box), min": full_pairs / box["rate"] / 60 if box else "n/a",
            }
            rows.append(row)
            print("  ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                            for key, val in row.items()), flush=True)
    write_tables(rows, args.out, peak, exps, args.quick)
    return 0


def write_tables(rows: list[dict], out: Path, peak: float, exps: float, quick: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(rows[0])
    lines = [f"matmul peak {peak / 1e9:.0f} GFLOP/s; in-cache exp {exps / 1e9:.2f} G elements/s; "
             f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}; "
             f"compiled kernel {fastkernel.available()}; ᾱ = {ALPHA_BAR}; top-{TOPK} tracking on"
             + ("; QUICK run" if quick else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .csv")


if __name__ == "__main__":
    raise SystemExit(main())
