"""Do the RG slides' forward processes help? Standard diffusion vs matched noise vs matched noise + component-wise
schedule (vs heat dissipation and blurring diffusion), each trained with the same network and budget, on φ⁴ lattice
fields and MNIST (rg-diffusion-slides.txt, "Summary: Matching noise + component-wise schedule is improvement!").

For every dataset and every process: train the same network (same seed, architecture, steps, batch, learning rate)
by denoising score matching under the process (`sf.training.train(..., process=proc)`), draw samples with the
process's reverse sampler (DDIM by default), and measure them against held-out data:

- power-spectrum error: mean over |k| shells of |ln(P_samples(k)/P_data(k))|, P the radially averaged periodic
  power spectrum ⟨|fft2 x|²⟩/HW (shell = |k| rounded to an integer; shells where the data has no power are left
  out);
- sliced Wasserstein distance SW₂ (√ of the mean over random unit directions of the squared 1-D W₂) between the
  samples and the held-out images;
- for φ⁴ (physical units φ = s·x): the 1-D Wasserstein distance of the magnetization M, of |M| and of the action S
  per sample, each divided by the held-out set's standard deviation of that quantity, and the relative L² error of
  the connected two-point function G(x) over all displacements (as lattice work compares generated samples with
  HMC).

Two reference rows bound each column: `training images` — training images against the held-out ones (the
statistical floor of the metric at this sample size) — and `free theory` — exact samples of the Gaussian N(μ, Σ)
fitted to the training set (what matching the second-order statistics alone gives).

The run directory holds config.json, train/<dataset>-<process>/ (each a training run), results/<dataset>-<process>
.json (one per finished pair, so an interrupted comparison resumes where it stopped), samples.npz per dataset, the
table comparison.csv / .md, and figures: <dataset>-spectra.png, <dataset>-samples.png and for φ⁴
phi4-observables.png (M and S histograms, G(r)).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runs import RunDir, markdown_table

Tensor = torch.Tensor

# label -> (process name, options, free theory)
PROCESS_CHOICES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "standard": ("standard", {}, False),
    "matched": ("matched", {}, False),
    "rg-cutoff": ("rg-cutoff", {}, False),
    "matched-rg": ("matched-rg", {}, False),
    "matched-rg-free": ("matched-rg", {}, True),
    "heat-dissipation": ("heat-dissipation", {}, False),
    "blurring": ("blurring", {}, False),
}
DEFAULT_PROCESSES = tuple(PROCESS_CHOICES)
DATASETS = ("phi4", "mnist", "grf")
REFERENCE_ROWS = ("training images", "free theory")


class ComparisonError(ValueError):
    """Invalid options of the process comparison."""


# ---- metrics -------------------------------------------------------------------------------------------------

def radial_power_spectrum(x: Tensor) -> tuple[Tensor, Tensor]:
    """(|k| shells [K], ⟨|fft2 x|²⟩/HW averaged over samples, channels and the shell [K]) for x [N, C, H, W];
    shell = round(|k|) with signed integer wavenumbers."""
    x = torch.as_tensor(x, dtype=torch.float64)
    H, W = x.shape[-2:]
    power = (torch.fft.fft2(x).abs() ** 2 / (H * W)).mean(dim=(0, 1))                 # [H, W]
    ky = torch.fft.fftfreq(H, d=1.0 / H, dtype=torch.float64)
    kx = torch.fft.fftfreq(W, d=1.0 / W, dtype=torch.float64)
    shell = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long().reshape(-1)
    sums = torch.zeros(int(shell.max()) + 1, dtype=torch.float64).index_add_(0, shell, power.reshape(-1))
    counts = torch.bincount(shell).to(torch.float64)
    keep = counts > 0
    return torch.arange(len(counts), dtype=torch.float64)[keep], sums[keep] / counts[keep]


def power_spectrum_error(samples: Tensor, reference: Tensor) -> float:
    """Mean over |k| shells of |ln(P_samples/P_reference)| (0 = identical spectra; 0.1 ≈ 10% off per shell); shells
    where the reference has no power (below 1e-8 of its largest, e.g. k = 0 of zero-mean fields) are left out."""
    _, ps = radial_power_spectrum(samples)
    _, pr = radial_power_spectrum(reference)
    keep = pr > 1e-8 * float(pr.max())
    tiny = 1e-12 * float(pr.max())
    return float(torch.log((ps[keep] + tiny) / (pr[keep] + tiny)).abs().mean())


def _quantiles(values: Tensor, n: int) -> Tensor:
    """The empirical quantile function of each column of values [M, P] at the n levels (i + ½)/n -> [n, P]."""
    v = torch.sort(values, dim=0).values
    if v.shape[0] == n:
        return v
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.quantile(v, levels, dim=0)


def wasserstein_1d(a: Tensor, b: Tensor) -> float:
    """W₁ between two 1-D empirical distributions (any sizes), through their quantile functions."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 1)
    n = max(a.shape[0], b.shape[0])
    return float((_quantiles(a, n) - _quantiles(b, n)).abs().mean())


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """SW₂ = √(mean over random unit directions θ of W₂²(θ·a, θ·b)) between sample sets a [N, ...], b [M, ...]."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(a.shape[0], -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(b.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    n = max(a.shape[0], b.shape[0])
    qa, qb = _quantiles(a @ theta, n), _quantiles(b @ theta, n)                   # [n, P]
    return float(((qa - qb) ** 2).mean().sqrt())


def phi4_observables(x: Tensor, scale: float, mass2: float, coupling: float) -> dict[str, Tensor]:
    """Magnetization, |M|, action per sample and the connected two-point function of image-unit fields x
    [N, 1, L, L] (φ = scale·x), from `scorefield.data.phi4`."""
    from ..data import phi4

    phi = phi4.fields(torch.as_tensor(x), scale=scale)
    M = phi4.magnetization(phi)
    return {"magnetization": M, "abs_magnetization": M.abs(), "action": phi4.action(phi, mass2, coupling),
            "two_point": phi4.two_point(phi, connected=True)}


def phi4_metrics(samples: Tensor, reference: Tensor, scale: float, mass2: float, coupling: float) -> dict[str, float]:
    """W₁ of M, |M| and S (each over the reference's standard deviation) and the relative L² error of G(x)."""
    s = phi4_observables(samples, scale, mass2, coupling)
    r = phi4_observables(reference, scale, mass2, coupling)
    out = {}
    for key, label in (("magnetization", "w1_M"), ("abs_magnetization", "w1_absM"), ("action", "w1_S")):
        out[label] = wasserstein_1d(s[key], r[key]) / max(float(r[key].std()), 1e-12)
    out["G_error"] = float((s["two_point"] - r["two_point"]).norm() / r["two_point"].norm())
    return out


def sample_metrics(samples: Tensor, reference: Tensor, dataset: str, phi4: dict[str, float] | None,
                   projections: int, seed: int) -> dict[str, float]:
    row = {"ps_error": power_spectrum_error(samples, reference),
           "swd": sliced_wasserstein(samples, reference, projections, seed)}
    if dataset == "phi4" and phi4 is not None:
        row.update(phi4_metrics(samples, reference, phi4["scale"], phi4["mass2"], phi4["coupling"]))
    return row


# ---- data ----------------------------------------------------------------------------------------------------

def load_pair(dataset: str, n_train: int, n_test: int, seed: int, phi4: dict[str, Any], mnist_subset: int | None
              ) -> tuple[Any, Tensor, dict[str, Any] | None, dict[str, Any]]:
    """(training ImageSet, held-out images [M, C, H, W] in the training set's units, φ⁴ parameters or None, the
    data spec). φ⁴ held-out fields are scaled by the training set's field scale (they may exceed ±1 slightly)."""
    import scorefield as sf

    if dataset == "phi4":
        from ..data import phi4 as phi4_module

        try:
            options = {"size": int(phi4.get("size", 6)), "mass2": float(phi4["mass2"]),
                       "coupling": float(phi4["coupling"])}
        except KeyError as exc:
            raise ComparisonError(f"φ⁴ needs {exc} (phi4_options)") from None
        extra = {k: v for k, v in phi4.items() if k not in ("size", "mass2", "coupling")}
        train = sf.data.load("phi4", n=n_train, seed=seed, **options, **extra)
        test = sf.data.load("phi4", split="test", n=n_test, seed=seed, **options, **extra)
        scale = phi4_module.field_scale(train)
        held_out = (phi4_module.fields(test) / scale).to(torch.float32)
        params = {"scale": scale, **options}
        return train, held_out, params, {"name": "phi4", "n": n_train, "seed": seed, **options, **extra}
    if dataset == "mnist":
        subset = mnist_subset or n_train
        train = sf.data.load("mnist", subset=subset, seed=seed)
        test = sf.data.load("mnist", split="test", subset=n_test, seed=seed)
        return train, test.images, None, {"name": "mnist", "subset": subset, "seed": seed}
    if dataset == "grf":
        train = sf.data.load("grf", n=n_train, size=8, seed=seed)
        test = sf.data.load("grf", split="test", n=n_test, size=8, seed=seed)
        return train, test.images, None, {"name": "grf", "n": n_train, "size": 8, "seed": seed}
    raise ComparisonError(f"unknown dataset '{dataset}'; available: {', '.join(DATASETS)}")


def gaussian_samples(data: Any, n: int, seed: int) -> Tensor:
    """Exact samples of N(μ, Σ) fitted to the training images (the free theory of the data)."""
    x = data.images.reshape(len(data), -1).to(torch.float64)
    mu, cov = x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, x.shape[1], generator=g, dtype=torch.float64)
    return (mu + (z * lam.clamp_min(0).sqrt()) @ U.T).reshape(n, *data.images.shape[1:]).to(torch.float32)


# ---- the comparison --------------------------------------------------------------------------------------------

def _process(label: str, data: Any, overrides: dict[str, Any]) -> Any:
    import scorefield as sf

    if label not in PROCESS_CHOICES:
        from ..options import closest

        raise ComparisonError(f"unknown process '{label}'{closest(label, PROCESS_CHOICES)}; available: "
                              f"{', '.join(PROCESS_CHOICES)}")
    name, options, free = PROCESS_CHOICES[label]
    options = {**options, **overrides.get(label, {})}
    return sf.forward.make(name, data, free_theory=free, **options)


def compare_processes(datasets: Sequence[str] = ("phi4", "mnist"), processes: Sequence[str] = DEFAULT_PROCESSES,
                      arch: str = "resnet", preset: str = "small", model_options: dict[str, Any] | None = None,
                      steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, lr_decay: float = 0.999,
                      ema: float | None = 0.99, grad_clip: float | None = 1.0, n_train: int = 2000,
                      n_test: int = 1000, n_samples: int = 1000, sample_steps: int = 50, sampler: str = "ddim",
                      phi4_options: dict[str, Any] | None = None, mnist_subset: int | None = None,
                      process_options: dict[str, dict[str, Any]] | None = None, projections: int = 256,
                      seed: int = 0, device: str | None = None, out: str | Path = "runs", name: str | None = None,
                      resume: str | Path | None = None, progress: bool = True, figures: bool = True) -> RunDir:
    """Train, sample and measure every process on every dataset (module docstring); returns the run directory.

    datasets: 'phi4' | 'mnist' | 'grf'; processes: labels of PROCESS_CHOICES ('standard', 'matched', 'rg-cutoff',
    'matched-rg', 'matched-rg-free' (with the free-theory score), 'heat-dissipation', 'blurring'); arch / preset /
    model_options: the one network (circular padding on φ⁴, zeros elsewhere); steps, batch_size, lr, lr_decay,
    ema, grad_clip: the one training budget; n_train / n_test: training and held-out sizes (mnist_subset overrides
    n_train for MNIST); n_samples, sample_steps, sampler: the samples measured; phi4_options: size, mass2,
    coupling (and any other φ⁴ loader option); process_options: per-label overrides, e.g.
    {'matched-rg': {'spread': 12}}; resume: an interrupted comparison's run directory (finished pairs are kept).
    """
    datasets, processes = list(datasets), list(processes)
    for d in datasets:
        if d not in DATASETS:
            raise ComparisonError(f"unknown dataset '{d}'; available: {', '.join(DATASETS)}")
    for p in processes:
        if p not in PROCESS_CHOICES:
            _process(p, None, {})
    if sampler not in ("ddim", "euler", "heun"):
        raise ComparisonError(f"sampler must be ddim, euler or heun, got {sampler!r}")
    for key, value in (("steps", steps), ("n_train", n_train), ("n_test", n_test), ("n_samples", n_samples),
                       ("sample_steps", sample_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ComparisonError(f"{key} must be a positive integer, got {value!r}")
    phi4_options = dict(phi4_options or {"size": 6, "mass2": -1.0, "coupling": 3.0, "z2_flip": True})
    config = {"datasets": datasets, "processes": processes, "arch": arch, "preset": preset,
              "model_options": dict(model_options or {}), "steps": steps, "batch_size": batch_size, "lr": lr,
              "lr_decay": lr_decay, "ema": ema, "grad_clip": grad_clip, "n_train": n_train, "n_test": n_test,
              "n_samples": n_samples, "sample_steps": sample_steps, "sampler": sampler,
              "phi4_options": phi4_options, "mnist_subset": mnist_subset,
              "process_options": dict(process_options or {}), "projections": projections, "seed": seed}
    if resume is not None:
        run = RunDir.open(resume)
        saved = {k: v for k, v in run.config.items() if k != "kind"}
        differ = [k for k in config if k not in ("datasets", "processes") and saved.get(k) != json.loads(
            json.dumps(config[k]))]
        if differ:
            raise ComparisonError(f"cannot resume {run.path}: options differ ({', '.join(differ)}); only datasets and "
                                  "processes may change")
    else:
        run = RunDir.create("compare-processes", config, root=out, name=name, seed=seed, device=device)
    run.lock()
    try:
        rows: list[dict[str, Any]] = []
        for dataset in datasets:
            rows += _compare_on(run, dataset, processes, config, device, progress, figures)
        columns = ["dataset", "process", "basis", "schedule", "colour", "free_theory", "final_loss", "ps_error",
                   "swd", "w1_M", "w1_absM", "w1_S", "G_error", "train_seconds", "sample_seconds"]
        columns = [c for c in columns if any(r.get(c, "") != "" for r in rows)]    # φ⁴ columns only with φ⁴
        rows = [{c: r.get(c, "") for c in columns} for r in rows]
        run.save_table("comparison", rows, replace=True, title=_title(config))
        run.write_json("summary.json", {"rows": rows, "knobs": knob_effects(rows)}, replace=True)
        return run
    finally:
        run.release()


def _title(config: dict[str, Any]) -> str:
    sizes = "".join(f", {k}={v}" for k, v in config["model_options"].items())
    return (f"forward processes compared: {config['arch']} ({config['preset']}{sizes}), {config['steps']} steps × "
            f"batch {config['batch_size']}, {config['n_samples']} samples by {config['sample_steps']}-step "
            f"{config['sampler']}, against {config['n_test']} held-out images")


def _compare_on(run: RunDir, dataset: str, processes: list[str], config: dict[str, Any], device: str | None,
                progress: bool, figures: bool) -> list[dict[str, Any]]:
    import scorefield as sf

    seed = config["seed"]
    data, held_out, phi4_params, data_spec = load_pair(dataset, config["n_train"], config["n_test"], seed,
                                                       config["phi4_options"], config["mnist_subset"])
    n_samples = config["n_samples"]
    samples: dict[str, Tensor] = {}
    rows = []
    # the two reference rows: the training set itself, and exact samples of its Gaussian fit
    g = torch.Generator().manual_seed(seed + 1)
    own = data.images[torch.randperm(len(data), generator=g)[:n_samples]]
    for label, x in (("training images", own), ("free theory", gaussian_samples(data, n_samples, seed + 2))):
        samples[label] = x
        rows.append({"dataset": dataset, "process": label, **sample_metrics(
            x, held_out, dataset, phi4_params, config["projections"], seed)})
    padding = "circular" if dataset in ("phi4", "grf") else "zeros"
    for label in processes:
        result_name = f"results/{dataset}-{label}.json"
        proc = _process(label, data, config["process_options"])
        if run.exists(result_name) and run.exists(f"results/{dataset}-{label}.npz"):
            row = run.read_json(result_name)
            samples[label] = torch.as_tensor(run.load_arrays(f"results/{dataset}-{label}")["samples"])
            rows.append(row)
            continue
        torch.manual_seed(seed)
        model = sf.models.make(config["arch"], data, preset=config["preset"], padding=padding,
                               **config["model_options"])
        t0 = time.perf_counter()
        result = sf.training.train(model, data, run_dir=run.path / "train" / f"{dataset}-{label}", process=proc,
                                   steps=config["steps"], epochs=None, batch_size=config["batch_size"],
                                   lr=config["lr"], lr_decay=config["lr_decay"], ema=config["ema"],
                                   grad_clip=config["grad_clip"], seed=seed, progress=progress, device=device,
                                   data_spec=data_spec, checkpoint_every=max(100, config["steps"] // 5))
        train_seconds = time.perf_counter() - t0
        net = result.model.to("cpu").eval()
        noise = sf.sampling.initial_noise(n_samples, net.image_shape, seed=10_000 * (seed + 1))
        t0 = time.perf_counter()
        x = sf.sampling.sample(net, noise, process=proc, steps=config["sample_steps"], sampler=config["sampler"],
                               progress=progress)
        sample_seconds = time.perf_counter() - t0
        finite = torch.isfinite(x).all(dim=(1, 2, 3))
        x = torch.where(finite[:, None, None, None], x, torch.zeros_like(x))
        spec = proc.spec()
        row = {"dataset": dataset, "process": label, "basis": spec.get("basis", "dct"),
               "schedule": spec.get("schedule", spec["name"]) + (f" (spread {spec['spread']:g})"
                                                                  if "spread" in spec else ""),
               "colour": spec.get("colour", "white"), "free_theory": proc.free_theory,
               "final_loss": result.final_loss, "non_finite_samples": int((~finite).sum()),
               **sample_metrics(x, held_out, dataset, phi4_params, config["projections"], seed),
               "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1)}
        run.save_arrays(f"results/{dataset}-{label}", replace=True, samples=x)
        run.write_json(result_name, row, replace=True)
        samples[label] = x
        rows.append(row)
    run.save_arrays(f"{dataset}-samples", replace=True, held_out=held_out,
                    **{k.replace(" ", "_").replace("(", "").replace(")", ""): v for k, v in samples.items()})
    if figures:
        _figures(run, dataset, held_out, samples, phi4_params)
    return rows


def knob_effects(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dataset, the change of every metric when one knob is turned with the others fixed (negative = better):
    colour (standard → matched; rg-cutoff → matched-rg), schedule (standard → rg-cutoff; matched → matched-rg),
    free theory (matched-rg → matched-rg-free); averaged over the pairs present."""
    pairs = {"colour": [("standard", "matched"), ("rg-cutoff", "matched-rg")],
             "schedule": [("standard", "rg-cutoff"), ("matched", "matched-rg")],
             "free_theory": [("matched-rg", "matched-rg-free")]}
    metrics = ("ps_error", "swd", "w1_M", "w1_absM", "w1_S", "G_error")
    out: dict[str, dict[str, float]] = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        by = {r["process"]: r for r in rows if r["dataset"] == dataset}
        for knob, knob_pairs in pairs.items():
            for metric in metrics:
                deltas = [float(by[b][metric]) - float(by[a][metric]) for a, b in knob_pairs
                          if a in by and b in by and by[a].get(metric, "") != "" and by[b].get(metric, "") != ""]
                if deltas:
                    out.setdefault(f"{dataset}/{knob}", {})[metric] = sum(deltas) / len(deltas)
    return out


# ---- figures ---------------------------------------------------------------------------------------------------

def _figures(run: RunDir, dataset: str, held_out: Tensor, samples: dict[str, Tensor],
             phi4_params: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.grid import image_grid

    fig, ax = plt.subplots(figsize=(5.5, 4))
    k, p = radial_power_spectrum(held_out)
    ax.plot(k, p, "k-", lw=2.5, label="held-out data")
    for label, x in samples.items():
        if label == "training images":
            continue
        kk, pp = radial_power_spectrum(x)
        ax.plot(kk, pp, lw=1.2, ls="--" if label == "free theory" else "-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("|k| (shell)")
    ax.set_ylabel("⟨|x_k|²⟩")
    ax.set_title(f"{dataset}: radially averaged power spectrum")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    run.save_figure(f"{dataset}-spectra", fig, replace=True)

    labels = ["held-out", *samples]
    fig, axes = plt.subplots(len(labels), 1, figsize=(8, 1.15 * len(labels)))
    for a, label in zip(np.atleast_1d(axes), labels, strict=True):
        x = held_out if label == "held-out" else samples[label]
        scale = float(x[:16].abs().max()) if dataset == "phi4" else 1.0
        a.imshow(image_grid(x[:16] / max(scale, 1e-12), columns=16)[..., 0], cmap="gray", vmin=0, vmax=1)
        a.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        a.set_xticks([])
        a.set_yticks([])
    run.save_figure(f"{dataset}-samples", fig, replace=True)

    if phi4_params is None:
        return
    params = {k: phi4_params[k] for k in ("scale", "mass2", "coupling")}
    obs = {"held-out data": phi4_observables(held_out, **params)}
    obs.update({label: phi4_observables(x, **params) for label, x in samples.items() if label != "training images"})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ref = obs["held-out data"]
    m_bins = np.linspace(float(ref["magnetization"].min()) * 1.3, float(ref["magnetization"].max()) * 1.3, 40)
    s_lo, s_hi = np.percentile(ref["action"].numpy(), [0.5, 99.5])
    s_bins = np.linspace(s_lo - 0.3 * (s_hi - s_lo), s_hi + 0.3 * (s_hi - s_lo), 40)
    L = ref["two_point"].shape[-1]
    r = np.arange(L // 2 + 1)
    for label, o in obs.items():
        style = {"color": "k", "lw": 2.5} if label == "held-out data" else {"lw": 1.1}
        axes[0].hist(o["magnetization"].numpy(), bins=m_bins, histtype="step", density=True, label=label, **style)
        axes[1].hist(o["action"].numpy(), bins=s_bins, histtype="step", density=True, label=label, **style)
        G = o["two_point"]
        axes[2].plot(r, (0.5 * (G[r, 0] + G[0, r])).numpy(), marker="o", ms=3, label=label, **style)
    axes[0].set_xlabel("magnetization M (per site)")
    axes[0].set_ylabel("probability density")
    axes[0].set_title("magnetization")
    axes[1].set_xlabel("action S")
    axes[1].set_ylabel("probability density")
    axes[1].set_title("action")
    axes[2].set_xlabel("distance r (lattice units)")
    axes[2].set_ylabel("connected G(r)")
    axes[2].set_title("two-point function (axis average)")
    fig.suptitle(f"φ⁴ samples of each forward process against held-out fields (m² = {params['mass2']}, "
                 f"λ = {params['coupling']})")
    axes[0].legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    run.save_figure("phi4-observables", fig, replace=True)


def format_table(run: RunDir) -> str:
    """The comparison table as Markdown (what the command prints)."""
    return run.file("comparison.md").read_text()


def summary_text(run: RunDir) -> str:
    """Which knob mattered: the mean change of each metric per knob (negative = better)."""
    knobs = run.read_json("summary.json")["knobs"]
    rows = [{"dataset / knob": k, **{m: f"{v:+.3g}" for m, v in d.items()}} for k, d in knobs.items()]
    return markdown_table(rows, title="knob effects (metric change when the knob is turned on; negative = better)") \
        if rows else ""


__all__ = ["DEFAULT_PROCESSES", "PROCESS_CHOICES", "compare_processes", "gaussian_samples", "knob_effects",
           "phi4_metrics", "power_spectrum_error", "radial_power_spectrum", "sliced_wasserstein",
           "wasserstein_1d"]
