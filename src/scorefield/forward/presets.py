"""`sf.forward.make`: the component process from a basis, a per-component schedule and a noise colour, and the
named presets — including the two neighbours of the RG slides in the literature, which are configurations of the
same diagonal family:

- `heat-dissipation` — inverse heat dissipation (Rissanen, Heinonen & Solin, ICLR 2023): the DCT basis, mean
  factor exp(−λ_k σ_B(t)²/2) (the heat equation ∂u/∂τ = Δu with Neumann boundaries run for τ = σ_B²/2, their
  DCTBlur), log-spaced σ_B from 0.5 to 20 (their MNIST configuration; by default σ_max = 20·N/28 for side N),
  constant noise σ = 0.01, networks predicting the clean image (the process erases high frequencies completely,
  so ε-prediction could not invert it), sampling from a Gaussian fit of the blurred data.
- `blurring` — blurring diffusion (Hoogeboom & Salimans, ICLR 2023): the DCT basis, mean factor
  α_t·((1 − d_min) exp(−λ_k τ_t) + d_min), τ_t = σ_B(t)²/2, σ_B(t) = σ_B,max sin²(πt/2), σ_B,max = 20, d_min = 0.001,
  white noise of variance σ_t² = 1 − α_t² with their truncated cosine log-SNR schedule (−10 … 10), ε-prediction.

and the RG-slides configurations by name: `standard` (pixels, equal, white: the toolkit's diffusion), `matched`
(Fourier, equal, matched colour), `rg-cutoff` (Fourier, RG cutoff, white), `matched-rg` (Fourier, RG cutoff,
matched: the slides' "matching noise + component-wise schedule"), `scale-by-scale` / `matched-scale-by-scale`
(Fourier, |k| shells noised one after another, spread 1, white / matched), and

- `wavelet` — wavelet score-based generative modeling (Guth, Coste, De Bortoli & Mallat, NeurIPS 2022): the
  orthonormal Haar basis with J levels (the most that halve both sides), the scale-by-scale schedule at spread 1
  with the levels as shells, and the "shell" colour. Guth et al. factorize p(x) = p(x_J) Π_j p(x̄_j | x_j)
  (x_j the low-pass at scale j, x̄_j its three detail bands) and generate coarsest first, each factor by its own
  standard diffusion of the coefficients normalized to unit variance. Here level j's coefficients c run, on their
  own window [a_j, a_j + 1/(J+1)] of t (finest details first, the low-pass x_J last), the base VP diffusion of
  c/S_j exactly: c(t)/S_j = √ᾱ(τ_j) c(0)/S_j + √(1 − ᾱ(τ_j)) ε, S_j² the data's power pooled over the level.
  Inside level j's window every coarser level is exactly clean (ᾱ = 1: the low-pass x_j is known) and every
  finer level is pure noise (ᾱ = ᾱ(t_max) = 3.7e-33 for the cosine, independent of the data to float64), so
  the score the network must learn there is their conditional score ∇ log p_τ(x̄_j | x_j), and reversing the
  process from t_max runs their cascade: x_J first, then x̄_J | x_J, …, x̄_1 | x_1.

  Identical to their model: the Haar (orthonormal) multiscale factorization and its generation order, the
  conditional distributions and scores of each stage, the per-scale normalization, a VP (Ornstein–Uhlenbeck)
  diffusion per stage, and the same number of sampler steps per scale (a uniform grid of (J+1)·n steps gives
  each window n). Not identical: (i) one network, on the full-resolution image and the process time, serves
  every stage (they train one network per scale on the low-pass grid, conditioned on x_j); it has to learn that
  the finer levels' noise carries no information; (ii) one training run draws t uniformly over all windows, so
  the stages share the budget (theirs are trained separately); (iii) the coefficients are scaled but not centred
  (the VP process contracts towards 0, not towards the level's mean); the normalization pools the three
  orientations of a level; (iv) the diffusion time per stage is the base schedule's (cosine by default) rather
  than their choice of horizon and discretization; (v) Haar only here, where they allow any orthonormal wavelet
  and use periodic boundaries for φ⁴ — Haar on even sides needs no boundary handling; (vi) the network predicts
  x̂₀ by default (as every scale-by-scale process here: the finer levels' x̂₀ from an ε estimate would be
  divided by m ≈ 0 at each window's start), where they learn the score; prediction='eps' is the option.
"""
from __future__ import annotations

from typing import Any

import torch

from ..options import closest
from .bases import Basis, dct_frequencies_squared, make_basis
from .process import COLOURS, ComponentProcess, DataStatistics, ProcessError, matched_colour, shell_colour
from .schedules import (
    ScaleByScaleSchedule,
    blurring_coefficients,
    heat_dissipation_coefficients,
    make_component_schedule,
)

# RG-slide configurations: shorthand for make("component", ...)
NAMED: dict[str, dict[str, Any]] = {
    "standard": {"basis": "pixel", "schedule": "equal", "colour": "white"},
    "matched": {"basis": "fourier", "schedule": "equal", "colour": "matched"},
    "rg-cutoff": {"basis": "fourier", "schedule": "rg-cutoff", "colour": "white"},
    "matched-rg": {"basis": "fourier", "schedule": "rg-cutoff", "colour": "matched"},
    "scale-by-scale": {"basis": "fourier", "schedule": "scale-by-scale", "colour": "white"},
    "matched-scale-by-scale": {"basis": "fourier", "schedule": "scale-by-scale", "colour": "matched"},
    "wavelet": {"basis": "haar", "schedule": "scale-by-scale", "colour": "shell", "spread": 1.0},
}
PRESETS = ("heat-dissipation", "blurring")
PROCESSES = ("component", *NAMED, *PRESETS)

# None: scaled with the image side N from the papers' settings (IHD: 20 at MNIST's N = 28; blurring diffusion: 20 at
# CIFAR-10's N = 32), so a 6 × 6 lattice is not blurred flat within the first tenth of the process
HEAT_DEFAULTS = {"sigma_min": 0.5, "sigma_max": None, "noise": 0.01}
BLURRING_DEFAULTS = {"sigma_blur_max": None, "min_scale": 0.001, "logsnr_min": -10.0, "logsnr_max": 10.0}


def available_processes() -> list[str]:
    return list(PROCESSES)


def _statistics(basis: Basis, data: Any) -> DataStatistics | None:
    if data is None:
        return None
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    if tuple(images.shape[1:]) != basis.image_shape:
        raise ProcessError(f"data images {tuple(images.shape[1:])} do not match the basis {basis.image_shape}")
    return DataStatistics.of(basis, images)


def _shape(data: Any, image_shape: Any) -> tuple[int, int, int] | None:
    if image_shape is not None:
        return tuple(int(s) for s in image_shape)  # type: ignore[return-value]
    if data is None:
        return None
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    return tuple(images.shape[1:])  # type: ignore[return-value]


def make(name: str = "component", data: Any = None, *, basis: str | None = None, schedule: str | None = None,
         colour: str | None = None, spread: float | None = None, base: str = "cosine", whiten: bool = False,
         levels: int | None = None, prediction: str | None = None, free_theory: bool = False,
         prior: str | None = None, image_shape: tuple[int, int, int] | None = None,
         colour_floor: float = 1e-4, **preset_options: Any) -> ComponentProcess:
    """A forward process for images like `data` (an ImageSet or [N, C, H, W] tensor; needed for PCA, the matched
    colour, the free theory and the Gaussian prior; else give image_shape).

    name: 'component' (choose basis, schedule, colour), one of the RG configurations 'standard' | 'matched' |
    'rg-cutoff' | 'matched-rg' | 'scale-by-scale' | 'matched-scale-by-scale' | 'wavelet' (Guth et al.; whose basis
    / schedule / colour / spread can still be overridden), or a preset 'heat-dissipation' | 'blurring' (options:
    sigma_min, sigma_max, noise | sigma_blur_max, min_scale, logsnr_min, logsnr_max). basis: 'pixel' | 'fourier' |
    'dct' | 'haar' | 'pca' (whiten, levels); schedule: 'equal' | 'rg-cutoff' (spread ≥ 0: the sharpness of the
    cutoff in units of the |k| range, default 8) | 'scale-by-scale' (spread ∈ [0, 1]: 0 all shells at once = equal,
    1 one shell after another = autoregressive, default 1); base: the toolkit schedule, cosine; colour: 'white' |
    'matched' | 'shell' (the matched power averaged per shell / Haar level); prediction: 'eps' | 'x0' (how a net is
    parametrized; default 'x0' for scale-by-scale at spread > 0 and the heat-dissipation preset, else 'eps');
    free_theory: add the Gaussian part of the score analytically; prior: 'noise' | 'gaussian'.
    """
    if name not in PROCESSES:
        raise ProcessError(f"unknown process '{name}'{closest(str(name), PROCESSES)}; available: "
                           f"{', '.join(PROCESSES)}")
    shape = _shape(data, image_shape)
    if shape is None:
        raise ProcessError("give the data (or image_shape) the process is for")
    if name in PRESETS:
        if any(v is not None for v in (basis, schedule, colour, spread, levels)) or whiten:
            raise ProcessError(f"the '{name}' preset has its own DCT basis and schedule; options: "
                               f"{', '.join(HEAT_DEFAULTS if name == 'heat-dissipation' else BLURRING_DEFAULTS)}")
        return _preset(name, data, shape, prediction, free_theory, prior, preset_options)
    if preset_options:
        raise ProcessError(f"unknown option(s) {', '.join(sorted(preset_options))} for process '{name}'")
    # a named configuration's basis / schedule / colour unless given; 'component' defaults to fourier, equal, white
    config = NAMED.get(name, {"basis": "fourier", "schedule": "equal", "colour": "white"})
    basis = config["basis"] if basis is None else basis
    schedule = config["schedule"] if schedule is None else schedule
    colour = config["colour"] if colour is None else colour
    spread = config.get("spread") if spread is None and schedule == config["schedule"] else spread
    if colour not in COLOURS:
        raise ProcessError(f"unknown colour '{colour}'{closest(str(colour), COLOURS)}; available: "
                           f"{', '.join(COLOURS)}")
    b = make_basis(basis, data, image_shape=shape, levels=levels, whiten=whiten)
    stats = _statistics(b, data)
    if colour in ("matched", "shell"):
        if stats is None:
            raise ProcessError(f"the {colour} colour needs the data (its power spectrum in the basis)")
        own = (matched_colour(stats, b.metric, colour_floor) if colour == "matched"
               else shell_colour(stats, b.metric, b.shells, colour_floor))
        S2 = own * b.metric
    else:
        S2 = b.metric.clone()
    sched = make_component_schedule(schedule, b.k_abs, base=base, spread=spread, shells=b.shells)
    spec = {"name": name, **b.spec(), **sched.spec(), "colour": colour}
    if colour != "white" and colour_floor != 1e-4:
        spec["colour_floor"] = colour_floor
    if prediction is None:
        # scale by scale, the finer shells sit at ᾱ_k = ᾱ(t_max) ≈ 0 until their window: their x̂₀ from an ε estimate
        # is (c − √v ε̂)/m, the net's error amplified by 1/m at every window's first step; predicting x̂₀ avoids it
        prediction = "x0" if isinstance(sched, ScaleByScaleSchedule) and not sched.equal else "eps"
    return ComponentProcess(b, name=name, schedule=sched, colour=S2, colour_name=colour, statistics=stats,
                            prediction=prediction, free_theory=free_theory, prior=prior or "noise", spec=spec)


def _preset(name: str, data: Any, shape: tuple[int, int, int], prediction: str | None, free_theory: bool,
            prior: str | None, options: dict[str, Any]) -> ComponentProcess:
    defaults = HEAT_DEFAULTS if name == "heat-dissipation" else BLURRING_DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ProcessError(f"unknown option(s) {', '.join(unknown)} for the '{name}' preset; options: "
                           f"{', '.join(defaults)}")
    C, H, W = shape
    side = max(H, W)
    resolved = {"sigma_max": 20.0 * side / 28, "sigma_blur_max": 20.0 * side / 32}
    opts = {k: float(options[k] if options.get(k) is not None else (v if v is not None else resolved[k]))
            for k, v in defaults.items()}
    b = make_basis("dct", data, image_shape=shape)
    lam = dct_frequencies_squared(H, W).repeat(C)                                   # [D]
    stats = _statistics(b, data)
    spec = {"name": name, **opts}
    if name == "heat-dissipation":
        if opts["sigma_min"] <= 0 or opts["sigma_max"] < opts["sigma_min"] or opts["noise"] <= 0:
            raise ProcessError(f"heat dissipation needs 0 < sigma_min ≤ sigma_max and noise > 0, got {opts}")

        def coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return heat_dissipation_coefficients(t, lam, opts["sigma_min"], opts["sigma_max"], opts["noise"])

        prior = prior or "gaussian"
        if prior == "gaussian" and stats is None:
            raise ProcessError("heat dissipation starts from the Gaussian fit of the blurred data: give the data")
        return ComponentProcess(b, name=name, coefficients=coefficients, t_range=(0.0, 1.0), statistics=stats,
                                prediction=prediction or "x0", free_theory=free_theory, prior=prior, spec=spec,
                                jump_at_t_min=True)
    if opts["sigma_blur_max"] < 0 or not 0 < opts["min_scale"] <= 1:
        raise ProcessError(f"blurring diffusion needs sigma_blur_max ≥ 0 and 0 < min_scale ≤ 1, got {opts}")

    def coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return blurring_coefficients(t, lam, opts["sigma_blur_max"], opts["min_scale"], opts["logsnr_min"],
                                     opts["logsnr_max"])

    return ComponentProcess(b, name=name, coefficients=coefficients, t_range=(0.0, 1.0), statistics=stats,
                            prediction=prediction or "eps", free_theory=free_theory, prior=prior or "noise",
                            spec=spec)


def from_spec(spec: dict[str, Any], data: Any = None) -> ComponentProcess:
    """Rebuild a process from `process.spec()` and the same data (the spec's keys are `make`'s arguments)."""
    spec = dict(spec)
    return make(spec.pop("name", "component"), data, **spec)
