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
matched: the slides' "matching noise + component-wise schedule").
"""
from __future__ import annotations

from typing import Any

import torch

from ..options import closest
from .bases import Basis, dct_frequencies_squared, make_basis
from .process import COLOURS, ComponentProcess, DataStatistics, ProcessError, matched_colour
from .schedules import blurring_coefficients, heat_dissipation_coefficients, make_component_schedule

# RG-slide configurations: shorthand for make("component", ...)
NAMED: dict[str, dict[str, Any]] = {
    "standard": {"basis": "pixel", "schedule": "equal", "colour": "white"},
    "matched": {"basis": "fourier", "schedule": "equal", "colour": "matched"},
    "rg-cutoff": {"basis": "fourier", "schedule": "rg-cutoff", "colour": "white"},
    "matched-rg": {"basis": "fourier", "schedule": "rg-cutoff", "colour": "matched"},
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
    'rg-cutoff' | 'matched-rg' (whose basis / schedule / colour can still be overridden), or a preset
    'heat-dissipation' | 'blurring' (options: sigma_min, sigma_max, noise | sigma_blur_max, min_scale, logsnr_min,
    logsnr_max). basis: 'pixel' | 'fourier' | 'dct' | 'haar' | 'pca' (whiten, levels); schedule: 'equal' |
    'rg-cutoff' (spread: the log-SNR separation of the lowest and highest |k|, the all-at-once → autoregressive
    knob; base: the toolkit schedule, cosine); colour: 'white' | 'matched'; prediction: 'eps' | 'x0' (how a net is
    parametrized); free_theory: add the Gaussian part of the score analytically; prior: 'noise' | 'gaussian'.
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
    if colour not in COLOURS:
        raise ProcessError(f"unknown colour '{colour}'{closest(str(colour), COLOURS)}; available: "
                           f"{', '.join(COLOURS)}")
    b = make_basis(basis, data, image_shape=shape, levels=levels, whiten=whiten)
    stats = _statistics(b, data)
    if colour == "matched":
        if stats is None:
            raise ProcessError("the matched colour needs the data (its power spectrum in the basis)")
        S2 = matched_colour(stats, b.metric, colour_floor) * b.metric
    else:
        S2 = b.metric.clone()
    sched = make_component_schedule(schedule, b.k_abs, base=base, spread=spread)
    spec = {"name": name, **b.spec(), **sched.spec(), "colour": colour}
    if colour == "matched" and colour_floor != 1e-4:
        spec["colour_floor"] = colour_floor
    return ComponentProcess(b, name=name, schedule=sched, colour=S2, colour_name=colour, statistics=stats,
                            prediction=prediction or "eps", free_theory=free_theory, prior=prior or "noise",
                            spec=spec)


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
