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

With `seeds` = N > 1 every (process, seed) unit is trained and sampled again with the seeds seed, seed + 1, …
(network initialization, batches and sampling noise change; the data, held-out set and metric projections do
not), and the table reports per metric the mean ± standard error (std/√N) over the seeds; the per-seed rows are
kept as data (comparison-seeds.csv, summary.json "seed_rows"), and the knob effects are paired differences
within a seed, averaged the same way.

Two reference rows bound each column: `training images` — training images against the held-out ones (the
statistical floor of the metric at this sample size) — and `free theory` — exact samples of the Gaussian N(μ, Σ)
fitted to the training set (what matching the second-order statistics alone gives).

The run directory holds config.json, train/<dataset>-<process>/ (each a training run), results/<dataset>-<process>
.json (one per finished pair, so an interrupted comparison resumes where it stopped), samples.npz per dataset, the
table comparison.csv / .md (with N seeds: mean and <metric>_se columns, the Markdown as mean ± s.e., and the
units of seeds after the first under <dataset>-<process>-seed<s>), and figures (from the first seed):
<dataset>-spectra.png, <dataset>-samples.png and for φ⁴ phi4-observables.png (M and S histograms, G(r)).

Under `torchrun --nproc-per-node N` the (dataset, process, seed) units still to do are listed in the one-process
order (datasets, then seeds, then processes) and dealt in rounds of N (`distributed.run_units`: unit kN + r of
round k to rank r). A rank trains its unit into train/<unit>/ itself (so the run directory must be on a file
system every rank sees: one node, or a shared file system) and rank 0 writes every unit's results/<unit>.json /
.npz as its round completes, then the tables and figures; the files equal those of one process (one thread per
rank) but for durations. A relaunched job resumes from the saved results. The bank split (`--shard bank`) does
not apply: a unit is a whole training.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..runs import RunDir, atomic_write_bytes, markdown_table

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
    # scale by scale (|k| shells one after another, autoregressive end of the knob) and wavelet score models
    "scale-by-scale": ("scale-by-scale", {}, False),
    "matched-scale-by-scale": ("matched-scale-by-scale", {}, False),
    "wavelet": ("wavelet", {}, False),
}
DEFAULT_PROCESSES = ("standard", "matched", "rg-cutoff", "matched-rg", "matched-rg-free", "heat-dissipation",
                     "blurring")
METRICS = ("ps_error", "swd", "w1_M", "w1_absM", "w1_S", "G_error")
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
                      resume: str | Path | None = None, progress: bool = True, figures: bool = True,
                      seeds: int = 1) -> RunDir:
    """Train, sample and measure every process on every dataset (module docstring); returns the run directory.

    datasets: 'phi4' | 'mnist' | 'grf'; processes: labels of PROCESS_CHOICES ('standard', 'matched', 'rg-cutoff',
    'matched-rg', 'matched-rg-free' (with the free-theory score), 'heat-dissipation', 'blurring'); arch / preset /
    model_options: the one network (circular padding on φ⁴, zeros elsewhere); steps, batch_size, lr, lr_decay,
    ema, grad_clip: the one training budget; n_train / n_test: training and held-out sizes (mnist_subset overrides
    n_train for MNIST); n_samples, sample_steps, sampler: the samples measured; phi4_options: size, mass2,
    coupling (and any other φ⁴ loader option); process_options: per-label overrides, e.g.
    {'matched-rg': {'spread': 12}}; resume: an interrupted comparison's run directory (finished units are kept;
    datasets, processes and seeds may change); seeds: how many seeds (seed, seed + 1, …) each process is trained
    and sampled with (the table then gives mean ± standard error).

    Under torchrun (after `scorefield.distributed.init()`; the CLI joins by itself) every rank calls this with the
    same options: the units are dealt to the ranks and rank 0 writes the run directory (module docstring).
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
                       ("sample_steps", sample_steps), ("batch_size", batch_size), ("seeds", seeds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ComparisonError(f"{key} must be a positive integer, got {value!r}")
    phi4_options = dict(phi4_options or {"size": 6, "mass2": -1.0, "coupling": 3.0, "z2_flip": True})
    config = {"datasets": datasets, "processes": processes, "arch": arch, "preset": preset,
              "model_options": dict(model_options or {}), "steps": steps, "batch_size": batch_size, "lr": lr,
              "lr_decay": lr_decay, "ema": ema, "grad_clip": grad_clip, "n_train": n_train, "n_test": n_test,
              "n_samples": n_samples, "sample_steps": sample_steps, "sampler": sampler,
              "phi4_options": phi4_options, "mnist_subset": mnist_subset,
              "process_options": dict(process_options or {}), "projections": projections, "seed": seed}
    run = distributed.shared_run(lambda: _open(resume, config, out, name, seed, device))
    try:
        pairs: dict[str, tuple] = {}                   # dataset -> load_pair(...), loaded once per rank
        # under torchrun the units are dealt to the ranks; rank 0 then writes the tables and figures alone
        _compute_units(run, datasets, processes, config, device, progress, seeds, pairs)
        with distributed.writer_only() as writing:
            if writing:
                _write_tables(run, datasets, processes, config, device, progress, figures, seeds, pairs)
        return run
    finally:
        run.release()


def _open(resume: str | Path | None, config: dict[str, Any], out: str | Path, name: str | None, seed: int,
          device: str | None) -> RunDir:
    """The comparison's run directory, created or (resume) reopened after checking its options; locked."""
    if resume is not None:
        run = RunDir.open(resume)
        saved = {k: v for k, v in run.config.items() if k != "kind"}
        differ = [k for k in config if k not in ("datasets", "processes", "seeds") and saved.get(k) != json.loads(
            json.dumps(config[k]))]
        if differ:
            listed = "; ".join(f"{k} {saved.get(k)!r} → {config[k]!r}" for k in differ)
            raise ComparisonError(f"cannot resume {run.path}: options differ ({listed}); only datasets, "
                                  "processes and seeds may change")
    else:
        run = RunDir.create("compare-processes", config, root=out, name=name, seed=seed, device=device)
    return run.lock()


def _write_tables(run: RunDir, datasets: list[str], processes: list[str], config: dict[str, Any],
                  device: str | None, progress: bool, figures: bool, seeds: int, pairs: dict[str, tuple]) -> None:
    """The reference rows, per-dataset samples and figures, comparison.csv/.md and summary.json, from the saved
    results of every unit."""
    rows: list[dict[str, Any]] = []
    for dataset in datasets:
        rows += _compare_on(run, dataset, processes, config, device, progress, figures, seeds, pairs)
    columns = ["dataset", "process", "basis", "schedule", "colour", "free_theory", "final_loss", "ps_error",
               "swd", "w1_M", "w1_absM", "w1_S", "G_error", "train_seconds", "sample_seconds"]
    columns = [c for c in columns if any(r.get(c, "") != "" for r in rows)]    # φ⁴ columns only with φ⁴
    if seeds == 1:
        rows = [{c: r.get(c, "") for c in columns} for r in rows]
        run.save_table("comparison", rows, replace=True, title=_title(config))
        run.write_json("summary.json", {"rows": rows, "knobs": knob_effects(rows)}, replace=True)
        return
    seed_rows = [{c: r.get(c, "") for c in ["seed", *columns]} for r in rows]
    run.save_table("comparison-seeds", seed_rows, replace=True, title=_title(config) + ", one row per seed")
    table = seed_means(seed_rows, columns)
    run.save_table("comparison", table, replace=True, title=_title(config))
    atomic_write_bytes(run.file("comparison.md"), markdown_table(
        [_plus_minus(r) for r in table],
        title=f"{_title(config)}; mean ± standard error over {seeds} seeds").encode())
    knobs, knobs_se = seeded_knob_effects(seed_rows)
    run.write_json("summary.json", {"rows": table, "seed_rows": seed_rows, "knobs": knobs,
                                    "knobs_se": knobs_se, "seeds": seeds}, replace=True)


def _unit_name(dataset: str, label: str, seed: int, base: int) -> str:
    """results/<name>.json/.npz and train/<name>/ of one (dataset, process, seed) unit."""
    return f"{dataset}-{label}" if seed == base else f"{dataset}-{label}-seed{seed}"


def _pair(pairs: dict[str, tuple], dataset: str, config: dict[str, Any]) -> tuple:
    """`load_pair` of a dataset under the comparison's options, loaded once."""
    if dataset not in pairs:
        pairs[dataset] = load_pair(dataset, config["n_train"], config["n_test"], config["seed"],
                                   config["phi4_options"], config["mnist_subset"])
    return pairs[dataset]


def _compute_units(run: RunDir, datasets: list[str], processes: list[str], config: dict[str, Any],
                   device: str | None, progress: bool, seeds: int, pairs: dict[str, tuple]) -> None:
    """Train, sample and measure every (dataset, process, seed) unit without saved results, in the one-process
    order; under torchrun dealt to the ranks in rounds (`distributed.run_units`), rank 0 saving each unit's
    results as its round completes (a relaunched job keeps them)."""
    base = config["seed"]
    units = [(dataset, label, seed) for dataset in datasets for seed in range(base, base + seeds)
             for label in processes]
    names = [_unit_name(dataset, label, seed, base) for dataset, label, seed in units]
    done = distributed.on_writer(lambda: [run.exists(f"results/{n}.json") and run.exists(f"results/{n}.npz")
                                          for n in names])
    pending = [k for k in range(len(units)) if not done[k]]

    def compute(k: int) -> tuple[dict[str, Any], Tensor]:
        dataset, label, seed = units[k]
        data, held_out, phi4_params, data_spec = _pair(pairs, dataset, config)
        return _train_and_measure(run, names[k], dataset, label, data, data_spec, held_out, phi4_params, config,
                                  seed, device, progress)

    def save(k: int, result: tuple[dict[str, Any], Tensor]) -> None:
        row, x = result
        run.save_arrays(f"results/{names[k]}", replace=True, samples=x)
        run.write_json(f"results/{names[k]}.json", row, replace=True)

    distributed.run_units(pending, compute, save, what="(dataset, process, seed) units")


def _title(config: dict[str, Any]) -> str:
    sizes = "".join(f", {k}={v}" for k, v in config["model_options"].items())
    return (f"forward processes compared: {config['arch']} ({config['preset']}{sizes}), {config['steps']} steps × "
            f"batch {config['batch_size']}, {config['n_samples']} samples by {config['sample_steps']}-step "
            f"{config['sampler']}, against {config['n_test']} held-out images")


def _compare_on(run: RunDir, dataset: str, processes: list[str], config: dict[str, Any], device: str | None,
                progress: bool, figures: bool, seeds: int = 1, pairs: dict[str, tuple] | None = None
                ) -> list[dict[str, Any]]:
    """The rows of one dataset, every process under every seed (one row per (process, seed), "seed" recorded);
    figures and <dataset>-samples.npz from the first seed."""
    base = config["seed"]
    data, held_out, phi4_params, data_spec = _pair({} if pairs is None else pairs, dataset, config)
    rows: list[dict[str, Any]] = []
    first: dict[str, Tensor] = {}
    for seed in range(base, base + seeds):
        samples: dict[str, Tensor] = {}
        # the two reference rows: the training set itself, and exact samples of its Gaussian fit
        g = torch.Generator().manual_seed(seed + 1)
        own = data.images[torch.randperm(len(data), generator=g)[:config["n_samples"]]]
        for label, x in (("training images", own),
                         ("free theory", gaussian_samples(data, config["n_samples"], seed + 2))):
            samples[label] = x
            rows.append({"dataset": dataset, "process": label, "seed": seed, **sample_metrics(
                x, held_out, dataset, phi4_params, config["projections"], base)})
        for label in processes:
            unit = _unit_name(dataset, label, seed, base)
            row, samples[label] = _unit(run, unit, dataset, label, data, data_spec, held_out, phi4_params, config,
                                        seed, device, progress)
            rows.append({**row, "seed": seed})
        if seed == base:
            first = samples
    run.save_arrays(f"{dataset}-samples", replace=True, held_out=held_out,
                    **{k.replace(" ", "_").replace("(", "").replace(")", ""): v for k, v in first.items()})
    if figures:
        _figures(run, dataset, held_out, first, phi4_params)
    return rows


def _unit(run: RunDir, unit: str, dataset: str, label: str, data: Any, data_spec: dict[str, Any], held_out: Tensor,
          phi4_params: dict[str, Any] | None, config: dict[str, Any], seed: int, device: str | None,
          progress: bool) -> tuple[dict[str, Any], Tensor]:
    """(row, samples) of one process under one seed: read back when results/<unit>.json/.npz exist (resume),
    else trained into train/<unit>, sampled and measured against the held-out images."""
    result_name = f"results/{unit}.json"
    if run.exists(result_name) and run.exists(f"results/{unit}.npz"):
        return run.read_json(result_name), torch.as_tensor(run.load_arrays(f"results/{unit}")["samples"])
    row, x = _train_and_measure(run, unit, dataset, label, data, data_spec, held_out, phi4_params, config, seed,
                                device, progress)
    run.save_arrays(f"results/{unit}", replace=True, samples=x)
    run.write_json(result_name, row, replace=True)
    return row, x


def _train_and_measure(run: RunDir, unit: str, dataset: str, label: str, data: Any, data_spec: dict[str, Any],
                       held_out: Tensor, phi4_params: dict[str, Any] | None, config: dict[str, Any], seed: int,
                       device: str | None, progress: bool) -> tuple[dict[str, Any], Tensor]:
    """(row, samples [n_samples, C, H, W]) of one unit, trained into train/<unit> (by the rank that computes it)
    and not saved: the caller (rank 0) writes results/<unit>.json/.npz."""
    import scorefield as sf

    n_samples = config["n_samples"]
    proc = _process(label, data, config["process_options"])
    padding = "circular" if dataset in ("phi4", "grf") else "zeros"
    torch.manual_seed(seed)
    model = sf.models.make(config["arch"], data, preset=config["preset"], padding=padding,
                           **config["model_options"])
    t0 = time.perf_counter()
    result = sf.training.train(model, data, run_dir=run.path / "train" / unit, process=proc,
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
           **sample_metrics(x, held_out, dataset, phi4_params, config["projections"], config["seed"]),
           "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1)}
    return row, x


def seed_means(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """One row per (dataset, process): the descriptive columns of its first seed, "seeds", and for every numeric
    column its mean over the seeds and (metrics only) the standard error std/√N (ddof 1; "" for one seed)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["process"]), []).append(r)
    numeric = ("final_loss", *METRICS, "train_seconds", "sample_seconds")
    out = []
    for group in groups.values():
        row = {c: group[0].get(c, "") for c in columns if c not in numeric}
        row["seeds"] = len(group)
        for c in columns:
            values = [float(r[c]) for r in group if c in numeric and r.get(c, "") != ""]
            if not values:
                continue
            row[c] = float(np.mean(values))
            if c in METRICS:
                row[f"{c}_se"] = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else ""
        out.append(row)
    return out


def _plus_minus(row: dict[str, Any]) -> dict[str, Any]:
    """A seed_means row for Markdown: "mean ± se" per metric, the _se columns folded in."""
    out = {}
    for c, v in row.items():
        if c.endswith("_se"):
            continue
        se = row.get(f"{c}_se", "")
        out[c] = f"{v:.3g} ± {se:.2g}" if c in METRICS and se != "" else (f"{v:.4g}" if isinstance(v, float) else v)
    return out


def seeded_knob_effects(seed_rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]],
                                                                  dict[str, dict[str, float]]]:
    """`knob_effects` within each seed (paired differences), then (mean, standard error) over the seeds."""
    per_seed = [knob_effects([r for r in seed_rows if r.get("seed") == s])
                for s in sorted({r.get("seed") for r in seed_rows})]
    means: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for key in sorted({k for effects in per_seed for k in effects}):
        for metric in METRICS:
            values = [e[key][metric] for e in per_seed if metric in e.get(key, {})]
            if values:
                means.setdefault(key, {})[metric] = float(np.mean(values))
                if len(values) > 1:
                    errors.setdefault(key, {})[metric] = float(np.std(values, ddof=1) / np.sqrt(len(values)))
    return means, errors


def knob_effects(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dataset, the change of every metric when one knob is turned with the others fixed (negative = better):
    colour (standard → matched; rg-cutoff → matched-rg; scale-by-scale → matched-scale-by-scale), schedule
    (standard → rg-cutoff; matched → matched-rg), scale by scale (standard → scale-by-scale; matched →
    matched-scale-by-scale), free theory (matched-rg → matched-rg-free); averaged over the pairs present."""
    pairs = {"colour": [("standard", "matched"), ("rg-cutoff", "matched-rg"),
                        ("scale-by-scale", "matched-scale-by-scale")],
             "schedule": [("standard", "rg-cutoff"), ("matched", "matched-rg")],
             "scale_by_scale": [("standard", "scale-by-scale"), ("matched", "matched-scale-by-scale")],
             "free_theory": [("matched-rg", "matched-rg-free")]}
    metrics = METRICS
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

GRID_COUNT = 16                                  # samples per row of the sample grids


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """One line style per label: the references fixed (held-out black, training grey dotted, free theory dashed),
    the processes in distinct colours (tab20: no colour repeats below 20 processes)."""
    import matplotlib

    fixed = {"held-out data": {"color": "k", "lw": 2.5, "ls": "-"},
             "training images": {"color": "0.55", "lw": 1.4, "ls": ":"},
             "free theory": {"color": "0.3", "lw": 1.2, "ls": "--"}}
    cmap = matplotlib.colormaps["tab20"] if len(labels) > 10 else matplotlib.colormaps["tab10"]
    out, i = {}, 0
    for label in labels:
        if label in fixed:
            out[label] = fixed[label]
        else:
            out[label] = {"color": cmap(i % cmap.N), "lw": 1.2, "ls": "-"}
            i += 1
    return out


def _figures(run: RunDir, dataset: str, held_out: Tensor, samples: dict[str, Tensor],
             phi4_params: dict[str, Any] | None) -> None:
    """<dataset>-spectra.png, <dataset>-samples.png and (φ⁴) phi4-observables.png, each with the numbers it
    shows in the .npz of the same name (the sample grid's are <dataset>-samples.npz)."""
    from ..plotting import select_backend

    select_backend()

    n = {label: len(x) for label, x in samples.items()}
    sizes = sorted({v for k, v in n.items() if k not in REFERENCE_ROWS}) or sorted(set(n.values()))
    count = "/".join(str(s) for s in sizes)
    units = f"x = φ/s, s = {phi4_params['scale']:.4g}" if phi4_params else "pixels x in [−1, 1]"
    _spectra_figure(run, dataset, held_out, samples, count, units)
    _samples_figure(run, dataset, held_out, samples, phi4_params, count)
    if phi4_params is not None:
        _observables_figure(run, held_out, samples, phi4_params, count)


def _spectra_figure(run: RunDir, dataset: str, held_out: Tensor, samples: dict[str, Tensor], count: str,
                    units: str) -> None:
    import matplotlib.pyplot as plt

    curves = {"held-out data": held_out, **samples}
    styles = _styles(list(curves))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    data = {}
    for label, x in curves.items():
        k, p = radial_power_spectrum(x)
        data[label] = p.numpy()
        ax.plot(k, p, label=f"{label} ({len(x)})", **styles[label])
    ax.set_yscale("log")
    ax.set_xlabel("|k|: wavenumber shell (|k| rounded to an integer, cycles per image side)")
    ax.set_ylabel(f"P(|k|) = ⟨|FFT x|²⟩ / HW\n(units of x²; {units})", fontsize=8)
    ax.set_title(f"{dataset}: radially averaged power spectrum, {count} samples per process", fontsize=10)
    ax.legend(title="samples (count)", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    run.save_arrays(f"{dataset}-spectra", replace=True, k=k.numpy(),
                    **{_key(label): v for label, v in data.items()})
    run.save_figure(f"{dataset}-spectra", fig, replace=True)


def _key(label: str) -> str:
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def _samples_figure(run: RunDir, dataset: str, held_out: Tensor, samples: dict[str, Tensor],
                    phi4_params: dict[str, Any] | None, count: str) -> None:
    """One row per sample set: its first GRID_COUNT images on one shared colour scale (φ⁴: the field φ, ± the
    held-out set's largest |φ|; else the pixel value in [−1, 1]), white gaps, a colour bar."""
    import matplotlib
    import matplotlib.pyplot as plt

    labels = ["held-out", *samples]
    if phi4_params is not None:
        scale = float(phi4_params["scale"])
        vmax = float(held_out.abs().max()) * scale
        cmap, vmin, what = matplotlib.colormaps["RdBu_r"], -vmax, "field φ = s·x (lattice units)"
    else:
        scale, vmin, vmax = 1.0, -1.0, 1.0
        cmap, what = matplotlib.colormaps["gray"], "pixel value x (image units)"
    cmap = cmap.with_extremes(bad="white")                                              # the gaps
    fig, axes = plt.subplots(len(labels), 1, figsize=(9, 0.75 + 0.62 * len(labels)), squeeze=False)
    image = None
    for a, label in zip(axes[:, 0], labels, strict=True):
        x = (held_out if label == "held-out" else samples[label])[:GRID_COUNT].to(torch.float64) * scale
        image = a.imshow(_tiles(x[:, 0]), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        total = len(held_out if label == "held-out" else samples[label])
        a.set_ylabel(f"{label}\n({min(GRID_COUNT, total)} of {total})", rotation=0, ha="right", va="center",
                     fontsize=7)
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{dataset}: the first {GRID_COUNT} images of each sample set ({count} samples per process); "
                 "values beyond the colour bar are clipped to its ends", fontsize=9)
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01, label=what)
    run.save_figure(f"{dataset}-samples", fig, replace=True)


def _tiles(x: Tensor, gap: int = 1) -> np.ndarray:
    """Images x [N, H, W] side by side in one row [H, N·(W+gap)−gap], NaN in the gaps (drawn white)."""
    n, h, w = x.shape
    canvas = np.full((h, n * (w + gap) - gap), np.nan)
    for i in range(n):
        canvas[:, i * (w + gap):i * (w + gap) + w] = x[i].numpy()
    return canvas


def _observables_figure(run: RunDir, held_out: Tensor, samples: dict[str, Tensor], phi4_params: dict[str, Any],
                        count: str) -> None:
    """M and S histograms (every sample counted: values beyond the range go into the end bins) and G(r), whose
    y range is the references' (curves beyond it are marked "off scale" in the legend)."""
    import matplotlib.pyplot as plt

    params = {k: phi4_params[k] for k in ("scale", "mass2", "coupling")}
    obs = {"held-out data": phi4_observables(held_out, **params)}
    obs.update({label: phi4_observables(x, **params) for label, x in samples.items()})
    styles = _styles(list(obs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
    ref = obs["held-out data"]
    m_lo, m_hi = float(ref["magnetization"].min()) * 1.3, float(ref["magnetization"].max()) * 1.3
    m_bins = np.linspace(min(m_lo, -m_hi), max(m_hi, -m_lo), 41)
    s_lo, s_hi = np.percentile(ref["action"].numpy(), [0.5, 99.5])
    s_bins = np.linspace(s_lo - 0.3 * (s_hi - s_lo), s_hi + 0.3 * (s_hi - s_lo), 41)
    L = ref["two_point"].shape[-1]
    r = np.arange(L // 2 + 1)
    refs = [(0.5 * (o["two_point"][r, 0] + o["two_point"][0, r])).numpy() for label, o in obs.items()
            if label in ("held-out data", "training images", "free theory")]
    g_lo = min(0.0, *(float(c.min()) for c in refs))                                    # 0: the baseline
    g_hi = max(0.0, *(float(c.max()) for c in refs))
    pad = 0.15 * (g_hi - g_lo) + 1e-12
    g_lo, g_hi = g_lo - pad, g_hi + pad
    saved = {"r": r, "m_bins": m_bins, "s_bins": s_bins}
    for label, o in obs.items():
        M, S = o["magnetization"].numpy(), o["action"].numpy()
        M, S = np.nan_to_num(M, nan=m_bins[-1]), np.nan_to_num(S, nan=s_bins[-1])
        G = (0.5 * (o["two_point"][r, 0] + o["two_point"][0, r])).numpy()
        outside = int(((M < m_bins[0]) | (M > m_bins[-1])).sum() + ((S < s_bins[0]) | (S > s_bins[-1])).sum())
        off = not np.all(np.isfinite(G)) or float(np.nanmin(G)) < g_lo or float(np.nanmax(G)) > g_hi
        name = label + (f" ({outside} M/S values in the end bins)" if outside else "") + (" (G off scale)" if off
                                                                                          else "")
        axes[0].hist(np.clip(M, m_bins[0], m_bins[-1]), bins=m_bins, histtype="step", density=True, label=name,
                     color=styles[label]["color"], lw=styles[label]["lw"], ls=styles[label]["ls"])
        axes[1].hist(np.clip(S, s_bins[0], s_bins[-1]), bins=s_bins, histtype="step", density=True,
                     color=styles[label]["color"], lw=styles[label]["lw"], ls=styles[label]["ls"])
        axes[2].plot(r, np.clip(G, g_lo, g_hi), marker="o", ms=3, **styles[label])
        saved.update({f"{_key(label)}_M": M, f"{_key(label)}_S": S, f"{_key(label)}_G": G})
    axes[0].set_xlabel("magnetization M = mean of φ over the lattice")
    axes[0].set_ylabel("probability density (per unit M)")
    axes[0].set_title("magnetization")
    axes[1].set_xlabel("action S[φ] (dimensionless)")
    axes[1].set_ylabel("probability density (per unit S)")
    axes[1].set_title("action")
    axes[2].set_ylim(g_lo, g_hi)
    axes[2].set_xlabel("distance r (lattice units)")
    axes[2].set_ylabel("connected G(r) = ⟨φ(0)φ(r)⟩ − ⟨φ⟩² (φ²)")
    axes[2].set_title("two-point function (average of the two axes)")
    fig.suptitle(f"φ⁴ samples of each forward process against held-out fields ({count} samples per process, "
                 f"m² = {params['mass2']}, λ = {params['coupling']})")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    run.save_arrays("phi4-observables", replace=True, **saved)
    run.save_figure("phi4-observables", fig, replace=True)


def format_table(run: RunDir) -> str:
    """The comparison table as Markdown (what the command prints)."""
    return run.file("comparison.md").read_text()


def summary_text(run: RunDir) -> str:
    """Which knob mattered: the mean change of each metric per knob (negative = better)."""
    summary = run.read_json("summary.json")
    knobs, errors = summary["knobs"], summary.get("knobs_se", {})

    def cell(key: str, metric: str, value: float) -> str:
        se = errors.get(key, {}).get(metric)
        return f"{value:+.3g}" if se is None else f"{value:+.3g} ± {se:.2g}"

    rows = [{"dataset / knob": k, **{m: cell(k, m, v) for m, v in d.items()}} for k, d in knobs.items()]
    title = "knob effects (metric change when the knob is turned on; negative = better"
    title += f"; mean ± s.e. of the paired change over {summary['seeds']} seeds)" if "seeds" in summary else ")"
    return markdown_table(rows, title=title) if rows else ""


__all__ = ["DEFAULT_PROCESSES", "PROCESS_CHOICES", "compare_processes", "gaussian_samples", "knob_effects",
           "phi4_metrics", "power_spectrum_error", "radial_power_spectrum", "sliced_wasserstein",
           "wasserstein_1d"]
