"""End-to-end ELS sampling: scorefield against a baseline following the released code, both against float64.

Samples `--samples` MNIST images with `--steps` deterministic DDIM steps (cosine schedule), patch size from 15
(highest noise) down to 3 (lowest), circular padding, bank = the first `--train` training images.
  * scorefield float32 (`sf.models.make("els", ...)`, the compiled kernel) and float64 (the reference) run the
    whole sampler; the error is the max |sample32 − sample64|.
  * the baseline (benchmarks/baseline_released.py) denoises the float64 trajectory's states at
    `--baseline-steps` evenly spaced steps (all by default); its per-step time is extrapolated to all steps
    when fewer are run, and its error is the max |x̂₀ − x̂₀(float64)| on those states (scorefield's is listed
    beside it on the same states).
  * scorefield float32 is timed again with a fresh model after the baseline, and the speed-up is the baseline's
    time over the mean of the two runs that bracket it (the virtual machine's speed drifts over minutes);
    per-step seconds and the path each step took (box sums or GEMM) come from the first run;
  * the fraction of (query, key) pairs the engine evaluates per step, from the engine's own count
    (`PatchPosterior.history`): pairs folded over Q × the raw bank N·H·W (deduplication, and with --prune the
    skipped clusters), and with --prune the certified bound on the neglected fraction of the mass.

    .venv/bin/python benchmarks/els_end_to_end.py                        # the full comparison (slow)
    .venv/bin/python benchmarks/els_end_to_end.py --train 200 --samples 2 --baseline-steps 4   # quick look

Writes benchmarks/out/els_end_to_end.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
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


def sample(model, noise: torch.Tensor, steps: int, record: list | None = None,
           step_seconds: list | None = None) -> tuple[torch.Tensor, float]:
    last = [time.perf_counter()]

    def keep(info: dict) -> None:
        now = time.perf_counter()
        if step_seconds is not None and info.get("x0_hat") is not None:
            step_seconds.append(now - last[0])
        last[0] = now
        if record is not None and info.get("x0_hat") is not None:
            x = info["x"].clone()                                            # [B, C, H, W]
            record.append((x, torch.full((x.shape[0],), float(info["alpha_bar"]), dtype=x.dtype)))

    start = time.perf_counter()
    out = sf.sampling.sample(model, noise, steps=steps, sampler="ddim", schedule="cosine", callback=keep)
    return out, time.perf_counter() - start


def engine_steps(model, steps: int) -> list[dict]:
    """The engine's own record of its first `steps` calls (one per sampler step)."""
    engine, _ = model.engines.get(None)
    return engine.history[:steps]


def prune_sweep(data, out: Path, sizes=(3, 7, 15), alpha_bars=(0.05, 0.5, 0.9, 0.97, 0.99)) -> None:
    """Certified cluster pruning against the plain engine, one denoiser call per (P, ᾱ) on 4 noisy held-out
    images: pairs folded (fraction of the raw bank), bound on the neglected mass, max |difference|, seconds."""
    from scorefield.engine import PatchPosterior

    n = data.images.shape[0] - 4
    bank, clean = data.images[:n], data.images[n:]
    gen = torch.Generator().manual_seed(1)
    rows = []
    for p in sizes:
        pruned, plain = PatchPosterior(bank, prune=True), PatchPosterior(bank, prune=False)
        start = time.perf_counter()
        pruned.bank(p, 0)
        build = time.perf_counter() - start
        plain.bank(p, 0)
        for ab in alpha_bars:
            x = ab**0.5 * clean + (1 - ab) ** 0.5 * torch.randn(clean.shape, generator=gen)
            start = time.perf_counter()
            got = pruned(x, ab, p)
            t_pruned = time.perf_counter() - start
            start = time.perf_counter()
            want = plain(x, ab, p)
            t_plain = time.perf_counter() - start
            rows.append({"P": p, "alpha_bar": ab, "clusters": pruned.bank(p, 0).index.clusters,
                         "cluster build s": build, "fraction pruned": pruned.last_stats["fraction"],
                         "fraction plain": plain.last_stats["fraction"],
                         "neglected mass bound": pruned.last_stats["neglected_bound"],
                         "max abs diff": float((got - want).abs().max()), "pruned s": t_pruned, "plain s": t_plain})
            print(rows[-1], flush=True)
    write(rows, {"train": n, "queries per call": 4 * data.images[0].numel()}, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="training images in the bank")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline-steps", type=int, default=None, help="baseline on this many steps only")
    parser.add_argument("--prune", action="store_true", help="certified cluster pruning in scorefield float32")
    parser.add_argument("--prune-reference", action="store_true",
                        help="prune the float64 reference too (its error is then bounded by 2e-6, not 0)")
    parser.add_argument("--no-reference-run", dest="reference_run", action="store_false",
                        help="skip the float64 sampler; check the chosen steps of scorefield's own trajectory")
    parser.add_argument("--check-samples", type=int, default=10**9,
                        help="samples of each chosen state the baseline and the reference denoise (the baseline's "
                             "time is scaled linearly to all samples)")
    parser.add_argument("--out", type=Path, default=OUT / "els_end_to_end")
    parser.add_argument("--prune-sweep", action="store_true",
                        help="only compare pruned and plain denoiser calls per (P, alpha_bar) (see prune_sweep)")
    args = parser.parse_args(argv)
    if args.prune_sweep:
        prune_sweep(sf.data.load("mnist", split="train", subset=args.train + 4, seed=0), args.out)
        return 0

    data = sf.data.load("mnist", split="train", subset=args.train, seed=0)
    sizes = patch_sizes(args.steps)
    noise = torch.randn(args.samples, *data.images.shape[1:], generator=torch.Generator().manual_seed(0))
    fast = sf.models.make("els", data, patch_size=sizes, padding="circular", prune=args.prune)
    exact = sf.models.make("els", data, patch_size=sizes, padding="circular", dtype=torch.float64,
                           prune=args.prune_reference)
    states: list = []
    step_seconds: list = []
    print(f"load {os.getloadavg()}; threads {torch.get_num_threads()}; sizes {sizes}", flush=True)
    s64 = t64 = None
    if args.reference_run:
        s64, t64 = sample(exact, noise.double(), args.steps, states)
        print(f"float64 reference: {t64:.1f} s", flush=True)
        s32, t32 = sample(fast, noise, args.steps, step_seconds=step_seconds)
        print(f"scorefield float32: {t32:.1f} s, max |err| {float((s32.double() - s64).abs().max()):.2e}",
              flush=True)
    else:   # the checked states come from scorefield's own trajectory
        s32, t32 = sample(fast, noise, args.steps, states, step_seconds)
        print(f"scorefield float32: {t32:.1f} s", flush=True)
    peak_after_sampling = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    check = slice(0, args.check_samples)

    baseline = ReleasedStyleELS(data.images, fast.patch_size_at)
    n_base = len(states) if args.baseline_steps is None else max(1, min(args.baseline_steps, len(states)))
    chosen = sorted({round(i * (len(states) - 1) / max(1, n_base - 1)) for i in range(n_base)})
    t_base, rows = 0.0, []
    records = engine_steps(fast, len(states))
    for i, (x, ab) in enumerate(states):
        row = {"step": i, "alpha_bar": float(ab[0]), "P": fast.patch_size_at(float(ab[0])),
               "scorefield s": step_seconds[i] if i < len(step_seconds) else "",
               "cross term": records[i].get("cross_term", ""),
               "pairs evaluated (fraction)": records[i]["fraction"],
               "neglected mass bound": records[i]["neglected_bound"]}
        if i in chosen:
            x, ab = x[check], ab[check]
            ref = exact(x.double(), ab)
            start = time.perf_counter()
            got = baseline(x.float(), ab.float())
            t_base += time.perf_counter() - start
            row["baseline max err"] = float((got.double() - ref).abs().max())
            row["scorefield max err"] = float((fast(x.float(), ab.float()).double() - ref).abs().max())
        rows.append(row)
        print(row, flush=True)
    checked = min(args.samples, args.check_samples)
    t_base_all = t_base * len(states) / len(chosen) * args.samples / checked   # the baseline is linear in B
    # the machine's speed drifts over minutes: time scorefield again (fresh model) after the baseline and
    # compare the baseline with the mean of the two runs that bracket it
    _, t32_after = sample(sf.models.make("els", data, patch_size=sizes, padding="circular", prune=args.prune),
                          noise, args.steps)
    print(f"scorefield float32 again, after the baseline: {t32_after:.1f} s", flush=True)
    t32_mean = (t32 + t32_after) / 2
    extrapolated = len(chosen) < len(states) or checked < args.samples
    summary = {
        "train": args.train, "samples": args.samples, "steps": args.steps,
        "scorefield s (before / after the baseline)": f"{t32:.1f} / {t32_after:.1f}",
        "float64 reference s": t64 if t64 is not None else "not run",
        "baseline s" + (" (extrapolated)" if extrapolated else ""): t_base_all,
        "speed-up vs baseline (mean of the two)": t_base_all / t32_mean,
        "scorefield sample max err": float((s32.double() - s64).abs().max()) if s64 is not None else "not run",
        "scorefield per-step max err": max(r.get("scorefield max err", 0.0) for r in rows),
        "baseline per-step max err": max(r.get("baseline max err", 0.0) for r in rows),
        "pruned": args.prune,
        "peak RSS MiB after sampling" + ("" if args.reference_run else " (scorefield only)"): peak_after_sampling,
        "peak RSS MiB (whole run)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
             f"load average (1, 5, 15 min) {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
             f"threads {torch.get_num_threads()}", "",
             "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in fields) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .csv")


if __name__ == "__main__":
    raise SystemExit(main())
