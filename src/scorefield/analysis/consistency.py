"""Local consistency of final samples (kamb-ganguli Theorem 4.1, App. B.4) and the Fig. 3 two-image check.

A sample φ is a locally consistent point of an LS / ELS / bbELS machine when every pixel equals the centre
pixel of the L2-nearest patch of its own bank (App. B.4, eq. 52–53). That nearest-patch centre is exactly the
machine's posterior mean at ᾱ = 1 (s² → 0 sends the softmax of eq. 8 / 10 / 40 to its arg-max), so the check is
φ(x) ≈ model(φ, ᾱ = 1)(x): distances on the final sample itself, at scale 1, with the machine's own bank and
padding.

Theorem 4.1 is conditional: it holds *if* lim φ_t and lim ∂_t φ_t exist as t → 0. A sampler that stops at a
finite grid can break it in two ways, which `diagnose_consistency` tells apart for every inconsistent pixel:

- *undecided*: the last denoiser call still split its posterior between patches with different centres, so
  the pixel is an average (a coarse grid whose last ᾱ is far from 1);
- *stale*: the last posterior was sharp, but on a patch that is no longer the nearest one to the final mosaic,
  because a neighbour switched patch in the same last steps. Each switch leaves the state lagging the
  denoiser by O(1), and the lag decays only like σ = √((1−ᾱ)/ᾱ); when switches keep cascading as σ → 0, the
  limit of ∂_t φ_t does not exist and the theorem does not apply.

`fine_end_grid` resolves the end of the reverse process (log-spaced times down to t_min); `switch_rate` counts
the patch switches of x̂₀ per decade of t along a trajectory, which shows whether the flow has settled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class ConsistencyError(ValueError):
    """Invalid samples, tolerance, grid or trajectory for a consistency check."""


@dataclass
class ConsistencyReport:
    """fraction: share of consistent pixels; consistent: [N, H, W] bool; nearest_centre: [N, C, H, W];
    deviation: [N, H, W] max over channels of |φ(x) − nearest centre|."""

    fraction: float
    consistent: Tensor
    nearest_centre: Tensor
    deviation: Tensor


def local_consistency(samples: Tensor, model: torch.nn.Module, labels: Tensor | None = None,
                      tol: float = 0.05) -> ConsistencyReport:
    """Theorem 4.1 check of samples [N, C, H, W] for a patch machine (its bank at ᾱ = 1: with a patch-size
    schedule, the lowest-noise size). A pixel is consistent when |φ(x) − ϕ*(0)| ≤ tol in every channel."""
    if not isinstance(samples, Tensor) or samples.ndim != 4:
        raise ConsistencyError(f"samples must be a [N, C, H, W] tensor, got {getattr(samples, 'shape', samples)}")
    if not tol >= 0:
        raise ConsistencyError(f"tol must be a non-negative number, got {tol!r}")
    with torch.no_grad():
        centre = model(samples, torch.ones(samples.shape[0], dtype=samples.dtype), labels)
    deviation = (samples - centre).abs().amax(1)
    consistent = deviation <= tol
    return ConsistencyReport(consistent.float().mean().item(), consistent, centre, deviation)


# ---- why a pixel is inconsistent ---------------------------------------------------------------------------

@dataclass
class ConsistencyDiagnosis:
    """The consistency report of the final samples, with every inconsistent pixel classified.

    undecided: [N, H, W] the last denoiser call (at `last_alpha_bar`) was not sharp at this pixel: its x̂₀ differs
    by more than tol from the centre of the nearest bank patch to x_t/√ᾱ (the posterior's arg-max).
    stale: [N, H, W] inconsistent although the last posterior was sharp (a neighbour moved after the choice).
    switches_per_decade: patch switches of x̂₀ per pixel per decade of t, [(t_low, t_high, rate)] (see
    `switch_rate`)."""

    report: ConsistencyReport
    undecided: Tensor
    stale: Tensor
    last_alpha_bar: float
    switches_per_decade: list[tuple[float, float, float]]

    @property
    def fraction(self) -> float:
        return self.report.fraction

    def summary(self) -> dict[str, float]:
        n = self.undecided.numel()
        return {"fraction": self.fraction, "undecided": int(self.undecided.sum()) / n,
                "stale": int(self.stale.sum()) / n, "last_one_minus_alpha_bar": 1.0 - self.last_alpha_bar}


def diagnose_consistency(model: torch.nn.Module, noise: Tensor, steps: int = 20, sampler: str = "ddim",
                         ts: Tensor | None = None, labels: Tensor | None = None, tol: float = 0.05,
                         schedule: str = "cosine") -> ConsistencyDiagnosis:
    """Sample from noise [N, C, H, W] with `sf.sampling.sample` (same options), record the trajectory, and
    classify each inconsistent pixel of the final samples as undecided or stale (module docstring).

    The argmax of the posterior of eq. 8 / 10 / 40 at (x_t, ᾱ) is the nearest bank patch to x_t/√ᾱ, because its
    logits are −ᾱ‖x_t/√ᾱ − ϕ‖²/(2(1−ᾱ)); so the machine at ᾱ = 1 on x_t/√ᾱ gives the centre a sharp posterior
    would have returned. The sampler keeps its state in float64, so grids reaching 1−ᾱ below ≈ 1e-7 run with
    float32 noise too; but the ᾱ handed to a denoiser takes the noise's dtype and rounds to 1 in float32, so a
    diagnosis that must resolve such noise levels needs float64 noise (and a float64 machine)."""
    from .. import sampling

    calls: list[dict] = []
    samples = sampling.sample(model, noise, steps=steps, sampler=sampler, ts=ts, labels=labels,
                              schedule=schedule, callback=calls.append)
    denoised = [c for c in calls if c["x0_hat"] is not None]
    if not denoised:
        raise ConsistencyError("the sampler made no denoiser call")
    report = local_consistency(samples, model, labels, tol)
    last = denoised[-1]
    ab = float(last["alpha_bar"])
    with torch.no_grad():
        argmax_centre = model(last["x"] / math.sqrt(ab), torch.ones(noise.shape[0], dtype=noise.dtype), labels)
    undecided = (last["x0_hat"] - argmax_centre).abs().amax(1) > tol
    inconsistent = ~report.consistent
    return ConsistencyDiagnosis(report, undecided & inconsistent, inconsistent & ~undecided, ab,
                                switch_rate([c["x0_hat"] for c in denoised], [c["t"] for c in denoised], tol))


def switch_rate(x0_hats: list[Tensor], times: list[float], tol: float = 0.05,
                decades: int = 12) -> list[tuple[float, float, float]]:
    """Patch switches per pixel per decade of t: a switch is a change of x̂₀ by more than tol between two
    consecutive denoiser calls at times `times` (descending), each x̂₀ [N, C, H, W]. Returns
    [(t_low, t_high, switches per pixel)] for the decades [10^-k−1, 10^-k), k = 0 … decades−1, that hold a call."""
    if len(x0_hats) != len(times) or len(x0_hats) < 2:
        raise ConsistencyError("switch_rate needs at least two x̂₀ with one time each")
    stack = torch.stack(x0_hats)                                          # [T, N, C, H, W]
    changed = ((stack[1:] - stack[:-1]).abs().amax(2) > tol).float()      # [T−1, N, H, W]
    t_after = torch.as_tensor(times[1:], dtype=torch.float64)
    rows = []
    for k in range(decades):
        hi, lo = 10.0 ** -k, 10.0 ** -(k + 1)
        inside = (t_after >= lo) & (t_after < hi)
        if inside.any():
            rows.append((lo, hi, changed[inside].sum().item() / changed[0].numel()))
    return rows


def fine_end_grid(uniform_steps: int = 20, log_steps: int = 100, t_switch: float = 0.05,
                  t_min: float = 1e-10) -> Tensor:
    """A descending time grid that resolves the end of the reverse process: `uniform_steps` uniform steps from
    t = 1 to t_switch, then `log_steps` log-spaced ones down to t_min, then t = 0 ([uniform+log+2] float64).

    On the cosine schedule 1−ᾱ ∝ t near 0, and after a patch switch the state relaxes onto the new mosaic only
    like σ ∝ √t, so every decade of t the flow needs must hold grid points; a uniform grid of n steps stops at
    1−ᾱ ≈ 0.04/n."""
    if not (0 < t_min < t_switch < 1) or uniform_steps < 1 or log_steps < 1:
        raise ConsistencyError(f"need 0 < t_min < t_switch < 1 and positive step counts, got t_min={t_min}, "
                               f"t_switch={t_switch}, steps={uniform_steps}/{log_steps}")
    head = torch.linspace(1.0, t_switch, uniform_steps + 1, dtype=torch.float64)
    tail = torch.logspace(math.log10(t_switch), math.log10(t_min), log_steps + 1, dtype=torch.float64)[1:]
    return torch.cat([head, tail, torch.zeros(1, dtype=torch.float64)])


# ---- the two-image example of Fig. 3 -------------------------------------------------------------------------

def two_state_consistency(samples: Tensor, patch_size: int = 3, tol: float = 1e-3) -> Tensor:
    """Fig. 3 rule for the all-black / all-white training set with periodic boundaries: a pixel is consistent
    when it is ±1 (within tol) and the majority sign of its P×P patch equals its own sign. Returns [N, H, W]."""
    r = patch_size // 2
    total = samples.sum(1, keepdim=True)
    patch_sum = F.avg_pool2d(F.pad(total, (r, r, r, r), mode="circular"), patch_size, stride=1,
                             divisor_override=1)[:, 0]
    binary = ((samples.abs() - 1).abs() <= tol).all(1)
    return binary & (torch.sign(patch_sum) == torch.sign(samples[:, 0]))


def fig3_experiment(size: int = 16, n: int = 8, steps: tuple[int, ...] = (20, 100), patch_size: int = 3,
                    seed: int = 0) -> dict[int, dict[str, float]]:
    """The Fig. 3 experiment: ELS with periodic 3×3 patches on {all −1, all +1}, DDIM on the cosine schedule;
    for each step count, how many pixels break the local-consistency rule (summed over n samples)."""
    from .. import data as sf_data
    from .. import models, sampling

    dataset = sf_data.ImageSet(torch.stack([torch.ones(1, size, size), -torch.ones(1, size, size)]),
                               name="two-state")
    model = models.make("els", dataset, patch_size=patch_size, padding="circular")
    noise = sampling.initial_noise(n, (1, size, size), seed=seed)
    result = {}
    for k in steps:
        out = sampling.sample(model, noise, steps=k, sampler="ddim", schedule="cosine")
        ok = two_state_consistency(out, patch_size)
        result[k] = {"broken_pixels": int((~ok).sum()), "pixels": ok.numel(),
                     "broken_samples": int((~ok).flatten(1).any(1).sum()), "samples": n}
    return result
