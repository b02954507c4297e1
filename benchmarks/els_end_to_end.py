"""End-to-end ELS sampling: scorefield against a baseline following the released code, both against float64.

Samples `--samples` MNIST images with `--steps` deterministic DDIM steps (cosine schedule), patch size from 15
(highest noise) down to 3 (lowest), circular padding, bank = the first `--train` training images.
  * scorefield float32 (`sf.models.make("els", ...)`, the compiled kernel) and float64 (the reference) run the
    whole sampler; the error is the max |sample32 − sample64|.
  * the baseline (benchmarks/baseline_released.py) denoises the float64 trajectory's states at
    `--baseline-steps` evenly spaced steps (all by default); its per-step time is extrapolated to all steps
    when fewer are run, and its error is the max |x̂₀ − x̂₀(float64)| on those states (scorefield's is listed
    beside it on the same states).
  * the fraction of (query, key) pairs the engine evaluates per step: bank keys after deduplication over
    the raw N·H·W (1.0 when the bank is streamed without deduplication).

    .venv/bin/python benchmarks/els_end_to_end.py                        # the full comparison (slow)
    .venv/bin/python benchmarks/els_end_to_end.py --train 200 --samples 2 --baseline-steps 4   # quick look

Writes benchmarks/out/els_end_to_end.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

import scorefield as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_released import ReleasedStyleELS  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def patch_sizes(steps: int) -> list[int]:
    """Odd sizes from 3 (lowest noise) to 15 (highest), one per step, listed from the lowest noise."""
    raw = torch.linspace(3, 15, steps)
    return [int(2 * round((float(v) - 1) / 2) + 1) for v in raw]


def sample(model, noise: torch.Tensor, steps: int, record: list | None = None) -> tuple[torch.Tensor, float]:
    def keep(info: dict) -> None:
        if record is not None and info.get("x0_hat") is not None:
            x = info["x"].clone()                                            # [B, C, H, W]
            record.append((x, torch.full((x.shape[0],), float(info["alpha_bar"]), dtype=x.dtype)))

    start = time.perf_counter()
    out = sf.sampling.sample(model, noise, steps=steps, sampler="ddim", schedule="cosine", callback=keep)
    return out, time.perf_counter() - start


def pair_fractions(model, states: list, data) -> list[float]:
    """Per step: keys the engine folds / raw bank size N·H·W (dedup of the cached bank)."""
    engine, _ = model.engines.get(None)
    n, _, h, w = data.images.shape
    fractions = []
    for _, ab in states:
        p = model.patch_size_at(float(ab[0]))
        fractions.append(engine.bank(p, 0).num_keys / (n * h * w))
    return fractions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="training images in the bank")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline-steps", type=int, default=None, help="baseline on this many steps only")
    parser.add_argument("--out", type=Path, default=OUT / "els_end_to_end")
    args = parser.parse_args(argv)

    data = sf.data.load("mnist", split="train", subset=args.train, seed=0)
    sizes = patch_sizes(args.steps)
    noise = torch.randn(args.samples, *data.images.shape[1:], generator=torch.Generator().manual_seed(0))
    fast = sf.models.make("els", data, patch_size=sizes, padding="circular")
    exact = sf.models.make("els", data, patch_size=sizes, padding="circular", dtype=torch.float64)
    states: list = []
    print(f"load {os.getloadavg()[0]:.2f}; threads {torch.get_num_threads()}; sizes {sizes}", flush=True)
    s64, t64 = sample(exact, noise.double(), args.steps, states)
    print(f"float64 reference: {t64:.1f} s", flush=True)
    s32, t32 = sample(fast, noise, args.steps)
    print(f"scorefield float32: {t32:.1f} s, max |err| {float((s32.double() - s64).abs().max()):.2e}", flush=True)

    baseline = ReleasedStyleELS(data.images, fast.patch_size_at)
    n_base = len(states) if args.baseline_steps is None else max(1, min(args.baseline_steps, len(states)))
    chosen = sorted({round(i * (len(states) - 1) / max(1, n_base - 1)) for i in range(n_base)})
    t_base, rows = 0.0, []
    fractions = pair_fractions(fast, states, data)
    for i, (x, ab) in enumerate(states):
        row = {"step": i, "alpha_bar": float(ab[0]), "P": fast.patch_size_at(float(ab[0])),
               "pairs evaluated (fraction)": fractions[i]}
        if i in chosen:
            ref = exact(x, ab)
            start = time.perf_counter()
            got = baseline(x.float(), ab.float())
            t_base += time.perf_counter() - start
            row["baseline max err"] = float((got.double() - ref).abs().max())
            row["scorefield max err"] = float((fast(x.float(), ab.float()).double() - ref).abs().max())
        rows.append(row)
        print(row, flush=True)
    t_base_all = t_base * len(states) / len(chosen)
    summary = {
        "train": args.train, "samples": args.samples, "steps": args.steps,
        "scorefield s": t32, "float64 reference s": t64,
        "baseline s" + (" (extrapolated)" if len(chosen) < len(states) else ""): t_base_all,
        "speed-up vs baseline": t_base_all / t32,
        "scorefield sample max err": float((s32.double() - s64).abs().max()),
        "baseline per-step max err": max(r.get("baseline max err", 0.0) for r in rows),
    }
    print(summary)
    write(rows, summary, args.out)
    return 0


def write(rows: list[dict], summary: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(summary) + " |", "|" + "---|" * len(summary),
             "| " + " | ".join(fmt(v) for v in summary.values()) + " |", "",
             f"load average {os.getloadavg()[0]:.2f}; threads {torch.get_num_threads()}", "",
             "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in fields) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .csv")


if __name__ == "__main__":
    raise SystemExit(main())
