"""The theories of `models/theories` on the engine against their reference implementations' algorithms.

- PSPC (Niedoba et al. 2024): `sf.models.make("pspc", patch_size=P)` (every patch position is a group of one
  batched, streamed engine call; the bank held and deduplicated when small) against a per-position Python
  loop like the reference repository's (plai-group/pspc `PSPCDenoiser.forward`: for each position, crop the
  noisy batch and the training images, then a streaming posterior over batches of 100 training images).
- PCA-locality (Lukoianov et al. 2025): `sf.models.make("pca-locality")` (per-pixel masks gathered and bucketed
  by size, one engine call per bucket) against a streamed per-call pass like the analytic-diffusion-studio's
  (`PCALocalityDenoiser.denoise`: build the D×D mask from the Wiener eigendecomposition, then per batch of 256
  training images the squared differences [B, k, D] times the mask [D, D]); the pass here folds with one global
  log-sum-exp, so both compute the same numbers (the studio normalizes within each batch of images).

Both sides run on the same inputs (MNIST test digits noised to ᾱ, the bank a subset of MNIST training
images, float32, this machine's threads), and the table reports the seconds of one call (best of `repeats`),
the speed-up and the largest difference between the two outputs. The engine's first call at a noise level
builds what it keeps (PSPC: the bank of that patch size; PCA-locality: the masks of that ᾱ); "engine, first"
is such a cold call, "engine" a warm one.

    .venv/bin/python benchmarks/theories.py            # 1,000 training images, 8 samples
    .venv/bin/python benchmarks/theories.py --quick    # smoke run

Writes benchmarks/out/theories.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import scorefield as sf
from scorefield.models.theories.pca_locality import locality_masks

OUT = Path(__file__).resolve().parent / "out"


def cpu_name() -> str:
    """The CPU as lscpu names it (else /proc/cpuinfo)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(repeats: int, fn, *args) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - tic)
    return best, out


# ---- the reference algorithms ----------------------------------------------------------------------------------

def streamed_posterior(z: torch.Tensor, a: torch.Tensor, s2: torch.Tensor, keys: torch.Tensor,
                       batch: int) -> torch.Tensor:
    """Σ_j softmax_j(−‖z − a·k_j‖²/(2s²)) k_j over keys [N, D] in batches (running max, normalizer and mean,
    as the reference's `empirical_pmean`): z [B, D], a, s2 [B]."""
    m = torch.full((z.shape[0], 1), -torch.inf)
    norm = torch.zeros(z.shape[0], 1)
    mean = torch.zeros_like(z)
    for start in range(0, keys.shape[0], batch):
        k = keys[start:start + batch]
        scores = -((z[:, None, :] - a[:, None, None] * k[None]) ** 2).sum(-1) / (2 * s2[:, None])
        m_new = torch.maximum(scores.max(1, keepdim=True).values, m)
        p = (scores - m_new).exp()
        scale = (m - m_new).exp()
        new_norm = norm * scale + p.sum(1, keepdim=True)
        mean = (mean * norm * scale + p @ k) / new_norm
        m, norm = m_new, new_norm
    return mean


def pspc_loop(x: torch.Tensor, ab: torch.Tensor, images: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's per-position loop (PSPC-Square)."""
    _, _, h, w = x.shape
    a, s2 = ab.sqrt(), 1 - ab
    out, count = torch.zeros_like(x), torch.zeros_like(x)
    for x0 in range(w):
        for y0 in range(h):
            if x0 + size > w or y0 + size > h:
                continue
            z = x[..., y0:y0 + size, x0:x0 + size].reshape(x.shape[0], -1)
            keys = images[..., y0:y0 + size, x0:x0 + size].reshape(images.shape[0], -1)
            mean = streamed_posterior(z, a, s2, keys, 100)
            out[..., y0:y0 + size, x0:x0 + size] += mean.reshape(x.shape[0], -1, size, size)
            count[..., y0:y0 + size, x0:x0 + size] += 1
    return out / count


def pca_locality_pass(x: torch.Tensor, ab: float, images: torch.Tensor, lam: torch.Tensor, vecs: torch.Tensor,
                      tau: float, batch: int = 256) -> torch.Tensor:
    """The studio's per-call pass: the mask from the eigendecomposition, then per batch of training images the
    masked distances Δ² @ mask [B, k, D] (folded here with one global log-sum-exp)."""
    mask = locality_masks(lam, vecs, ab, tau, "row").to(torch.float32)   # B[n, m] untransposed, as the studio holds it
    b = x.shape[0]
    xt = x.reshape(b, -1)
    a, s2 = ab ** 0.5, 1 - ab
    m = torch.full((b, xt.shape[1]), -torch.inf)
    norm = torch.zeros(b, xt.shape[1])
    acc = torch.zeros(b, xt.shape[1])
    flat = images.reshape(images.shape[0], -1)
    for start in range(0, flat.shape[0], batch):
        y = flat[start:start + batch]                                               # [k, D]
        delta = (xt[:, None, :] - a * y[None]) ** 2                                 # [B, k, D]
        logits = -torch.einsum("bkn,nm->bkm", delta, mask) / (2 * s2)
        m_new = torch.maximum(m, logits.max(1).values)
        p = (logits - m_new[:, None]).exp()
        scale = (m - m_new).exp()
        norm = norm * scale + p.sum(1)
        acc = acc * scale + (p * y[None]).sum(1)
        m = m_new
    return (acc / norm).reshape(x.shape)


# ---- the benchmark -------------------------------------------------------------------------------------------

def noisy(clean: torch.Tensor, ab_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ab = torch.full((clean.shape[0],), ab_value)
    return ab.sqrt()[:, None, None, None] * clean + (1 - ab).sqrt()[:, None, None, None] * torch.randn(
        clean.shape, generator=g), ab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sizes", default="3,7,15,28", help="PSPC patch sizes")
    ap.add_argument("--alpha-bars", default="0.1,0.5,0.9")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT / "theories"))
    args = ap.parse_args()
    if args.quick:
        args.bank, args.samples, args.sizes, args.alpha_bars, args.repeats = 100, 2, "3,28", "0.5", 1
    data = sf.data.load("mnist", subset=args.bank, seed=0)
    clean = sf.data.load("mnist", split="test", subset=args.samples, seed=1).images
    images = data.images
    rows = []
    for ab_value in [float(v) for v in args.alpha_bars.split(",")]:
        x, ab = noisy(clean, ab_value)
        for size in [int(v) for v in args.sizes.split(",")]:
            model = sf.models.make("pspc", data, patch_size=size)
            cold, _ = timed(1, model, x, ab)
            warm, got = timed(args.repeats, model, x, ab)
            ref_s, ref = timed(args.repeats, pspc_loop, x, ab, images, size)
            rows.append({"theory": "pspc", "setting": f"P={size}", "alpha_bar": ab_value,
                         "reference": "per-position loop", "reference_s": ref_s, "engine_first_s": cold,
                         "engine_s": warm, "speedup": ref_s / warm, "max_abs_diff": float((got - ref).abs().max())})
            print(rows[-1], flush=True)
        model = sf.models.make("pca-locality", data)
        bank = model.bank(None)
        cold, _ = timed(1, model, x, ab)
        warm, got = timed(args.repeats, model, x, ab)
        ref_s, ref = timed(args.repeats, pca_locality_pass, x, ab_value, images, bank.eigenvalues,
                           bank.eigenvectors, 0.02)
        sizes = model.masks(ab_value).sum(1).double()
        rows.append({"theory": "pca-locality", "setting": f"mask mean {sizes.mean():.0f}, max {sizes.max():.0f}",
                     "alpha_bar": ab_value, "reference": "streamed dense pass", "reference_s": ref_s,
                     "engine_first_s": cold, "engine_s": warm, "speedup": ref_s / warm,
                     "max_abs_diff": float((got - ref).abs().max())})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)    # noqa: E731
    header = (f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}; bank {args.bank} MNIST training images; "
              f"{args.samples} noisy MNIST test digits per call; float32; best of {args.repeats}")
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
