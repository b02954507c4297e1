"""Effective receptive fields of denoisers (kamb-ganguli Fig. 4 left, App. C.2).

For noisy inputs x at a given ᾱ, the map is the mean over inputs (and output channels) of
|∂ x̂₀(x)[c, centre] / ∂ x[c', i, j]|, summed over input channels c' — how much the centre pixel of the
denoised output depends on each input pixel. Its size per ᾱ is summarized by the smallest radius around the
centre holding `mass` (90%) of the gradient mass: a Euclidean radius, and the side P of the smallest centred
P×P square (directly comparable with the patch size of an ELS machine). Both are also given with the centre
pixel left out, since at low noise x̂₀ ≈ x/√ᾱ makes the centre dominate.

Gradients come from autograd (every denoiser here, trained or analytic, is differentiable torch code);
central finite differences are the fallback for a model whose output carries no autograd graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ImageSet
from ..models.base import Denoiser
from ..runs import RunDir
from ..schedules import get_schedule

DEFAULT_TIMES = (0.95, 0.8, 0.6, 0.4, 0.2, 0.05)
METHODS = ("auto", "autograd", "fd")
FD_STEP = 1e-2


class ReceptiveFieldError(ValueError):
    """Receptive fields were asked for with invalid options."""


@dataclass
class ReceptiveFieldResult:
    """Gradient maps [T, H, W] at each ᾱ [T] and the sizes that hold `mass` of them."""

    alpha_bars: np.ndarray
    maps: np.ndarray
    centre: tuple[int, int]
    mass: float
    radius: np.ndarray
    patch_size: np.ndarray
    radius_without_centre: np.ndarray
    patch_size_without_centre: np.ndarray
    method: str
    n: int

    def rows(self) -> list[dict[str, Any]]:
        """One table row per ᾱ, in the names of the figures: P90 (side of the smallest centred odd square
        holding 90% of the gradient mass), r90 (the Euclidean radius holding it), each also without the
        centre pixel, and the centre pixel's share of the mass."""
        pct = int(self.mass * 100)
        return [{"alpha_bar": float(ab), f"P{pct}": int(p), f"P{pct}_without_centre": int(pc),
                 f"r{pct}": float(r), f"r{pct}_without_centre": float(rc),
                 "centre_fraction": float(m[self.centre] / m.sum())}
                for ab, r, p, rc, pc, m in zip(self.alpha_bars, self.radius, self.patch_size,
                                               self.radius_without_centre, self.patch_size_without_centre,
                                               self.maps, strict=True)]


def default_alpha_bars(schedule: str = "cosine", times: tuple[float, ...] = DEFAULT_TIMES) -> list[float]:
    """ᾱ at a few times of `schedule` (from high noise to low noise)."""
    sched = get_schedule(schedule)
    t = torch.tensor([sched.t_min + s * (sched.t_max - sched.t_min) for s in times], dtype=torch.float64)
    return [float(a) for a in sched.alpha_bar(t).clamp(1e-4, 1.0)]


# ---- gradients -------------------------------------------------------------------------------------------

def _autograd_map(model: Denoiser, x: torch.Tensor, ab: torch.Tensor, labels: torch.Tensor | None,
                  centre: tuple[int, int]) -> torch.Tensor | None:
    """Σ_c' |∂ out[b, c, centre] / ∂ x[b, c']| summed over output channels c: [B, H, W]; None if no graph."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x, ab, labels)  # [B, C, H, W]
        if not out.requires_grad:
            return None
        total = torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=x.dtype)
        channels = out.shape[1]
        for c in range(channels):
            # samples are independent, so the gradient of the batch sum is each sample's own gradient
            (grad,) = torch.autograd.grad(out[:, c, centre[0], centre[1]].sum(), x, retain_graph=c < channels - 1)
            total += grad.abs().sum(1).detach()
    return total / channels


def _fd_map(model: Denoiser, x: torch.Tensor, ab: torch.Tensor, labels: torch.Tensor | None,
            centre: tuple[int, int], chunk: int = 64) -> torch.Tensor:
    """Central finite differences of the centre output pixel, one input pixel at a time: [B, H, W]."""
    b, c, h, w = x.shape
    total = torch.zeros(b, h, w, dtype=x.dtype)
    basis = torch.eye(c * h * w, dtype=x.dtype).reshape(-1, c, h, w) * FD_STEP  # [CHW, C, H, W]
    with torch.no_grad():
        for s in range(b):
            grads = []
            for start in range(0, len(basis), chunk):
                e = basis[start:start + chunk]
                plus, minus = x[s:s + 1] + e, x[s:s + 1] - e
                lab = None if labels is None else labels[s:s + 1].expand(len(e))
                ab_s = ab[s:s + 1].expand(len(e))
                diff = model(plus, ab_s, lab)[:, :, centre[0], centre[1]] - model(minus, ab_s, lab)[:, :, centre[0],
                                                                                                  centre[1]]
                grads.append((diff / (2 * FD_STEP)).abs().mean(1))  # [chunk], mean over output channels
            total[s] = torch.cat(grads).reshape(c, h, w).sum(0)
    return total


# ---- sizes -----------------------------------------------------------------------------------------------

def size_holding_mass(grad_map: np.ndarray, centre: tuple[int, int], mass: float, metric: str,
                      without_centre: bool = False) -> float:
    """Smallest distance d from the centre such that pixels at distance ≤ d hold `mass` of the map's total.
    metric 'euclidean' gives a radius; 'chebyshev' gives the half-side of a square."""
    h, w = grad_map.shape
    ii, jj = np.meshgrid(np.arange(h) - centre[0], np.arange(w) - centre[1], indexing="ij")
    dist = np.hypot(ii, jj) if metric == "euclidean" else np.maximum(np.abs(ii), np.abs(jj))
    values = grad_map.astype(np.float64).copy()
    if without_centre:
        values[centre] = 0.0
    total = values.sum()
    if total <= 0:
        return 0.0
    order = np.argsort(dist, axis=None, kind="stable")
    d_sorted, v_sorted = dist.reshape(-1)[order], values.reshape(-1)[order]
    cum = np.cumsum(v_sorted)
    # the mass within distance d includes every pixel at exactly d: evaluate at the last pixel of each distance
    last = np.r_[d_sorted[1:] != d_sorted[:-1], True]
    hit = np.nonzero(last & (cum >= mass * total * (1 - 1e-12)))[0]
    return float(d_sorted[hit[0]])


# ---- the analysis ----------------------------------------------------------------------------------------

def _inputs(shape: tuple[int, int, int], ab: float, n: int, data: ImageSet | None,
            generator: torch.Generator) -> torch.Tensor:
    eps = torch.randn((n, *shape), generator=generator)
    if data is None:
        return eps  # pure noise inputs
    index = torch.randint(len(data), (n,), generator=generator)
    return ab ** 0.5 * data.images[index] + (1 - ab) ** 0.5 * eps  # eq. 20


def receptive_field(model: Denoiser, alpha_bars: list[float] | None = None, n: int = 16, seed: int = 0,
                    data: ImageSet | None = None, labels: torch.Tensor | None = None, method: str = "auto",
                    mass: float = 0.9, batch_size: int = 16, progress: bool = True) -> ReceptiveFieldResult:
    """Mean |∂ x̂₀(centre) / ∂ x| over n noisy inputs at each ᾱ, and the sizes holding `mass` of it.

    Inputs are x = √ᾱ x₀ + √(1−ᾱ) ε with x₀ drawn from `data`, or pure N(0, I) noise when data is None.
    labels: [n] class labels for a conditional model. method: 'auto' (autograd, finite differences if the
    model has no autograd graph), 'autograd' or 'fd'.
    """
    if method not in METHODS:
        raise ReceptiveFieldError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    if not 0 < mass <= 1:
        raise ReceptiveFieldError(f"mass must lie in (0, 1], got {mass}")
    if n < 1 or batch_size < 1:
        raise ReceptiveFieldError(f"n and batch_size must be positive, got {n} and {batch_size}")
    shape = tuple(getattr(model, "image_shape", ()) or ())
    if data is not None:
        if len(shape) == 3 and tuple(data.images.shape[1:]) != shape:
            raise ReceptiveFieldError(f"data images are {tuple(data.images.shape[1:])} but the model expects {shape}")
        shape = tuple(data.images.shape[1:])
    if len(shape) != 3:
        raise ReceptiveFieldError("the model has no image_shape; pass data= to set the input shape")
    schedule = getattr(getattr(model, "schedule", None), "name", "cosine")
    alpha_bars = default_alpha_bars(schedule) if alpha_bars is None else [float(a) for a in alpha_bars]
    if not alpha_bars or any(not 0 < a <= 1 for a in alpha_bars):
        raise ReceptiveFieldError(f"alpha_bars must lie in (0, 1], got {alpha_bars}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(labels) != n:
            raise ReceptiveFieldError(f"labels must have n={n} entries, got {len(labels)}")
    centre = (shape[1] // 2, shape[2] // 2)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    maps, used = [], set()
    bar = tqdm(total=len(alpha_bars) * n, disable=not progress, desc="receptive field")
    for ab in alpha_bars:
        x_all = _inputs(shape, ab, n, data, generator).to(dtype)  # [n, C, H, W]
        acc = torch.zeros(shape[1], shape[2], dtype=torch.float64)
        for start in range(0, n, batch_size):
            x = x_all[start:start + batch_size]
            ab_b = torch.full((len(x),), ab, dtype=dtype)
            lab = None if labels is None else labels[start:start + len(x)]
            grad = None if method == "fd" else _autograd_map(model, x, ab_b, lab, centre)
            if grad is None:
                if method == "autograd":
                    raise ReceptiveFieldError("the model output carries no autograd graph; use method='fd'")
                grad, kind = _fd_map(model, x, ab_b, lab, centre), "fd"
            else:
                kind = "autograd"
            used.add(kind)
            acc += grad.to(torch.float64).sum(0)
            bar.update(len(x))
        maps.append((acc / n).numpy())
    bar.close()
    stack = np.stack(maps)  # [T, H, W]

    def sizes(metric: str, without: bool) -> np.ndarray:
        return np.array([size_holding_mass(m, centre, mass, metric, without) for m in stack])

    return ReceptiveFieldResult(
        alpha_bars=np.array(alpha_bars), maps=stack, centre=centre, mass=mass,
        radius=sizes("euclidean", False), patch_size=(2 * sizes("chebyshev", False) + 1).astype(int),
        radius_without_centre=sizes("euclidean", True),
        patch_size_without_centre=(2 * sizes("chebyshev", True) + 1).astype(int),
        method="+".join(sorted(used)), n=n)


# ---- outputs ---------------------------------------------------------------------------------------------

def heatmap_figure(result: ReceptiveFieldResult, title: str = ""):
    """One heat map per ᾱ (centre pixel omitted, as in kamb-ganguli Fig. 4), each scaled to its own maximum, with
    the square of side P90-without-centre drawn on it."""
    from ..plotting import select_backend

    select_backend()
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    t = len(result.alpha_bars)
    pct = int(result.mass * 100)
    fig, axes = plt.subplots(1, t, figsize=(1.9 * t + 0.8, 2.6), squeeze=False)
    image = None
    for ax, ab, grad_map, p in zip(axes[0], result.alpha_bars, result.maps,
                                   result.patch_size_without_centre, strict=True):
        shown = grad_map.copy()
        shown[result.centre] = np.nan
        image = ax.imshow(shown / max(np.nanmax(shown), 1e-300), cmap="magma", vmin=0, vmax=1)
        cy, cx = result.centre
        ax.add_patch(Rectangle((cx - p / 2, cy - p / 2), p, p, fill=False, edgecolor="cyan", linewidth=0.8))
        ax.set_title(f"ᾱ = {ab:.3g}\nP{pct} w/o centre = {p}", fontsize=8)
        ax.axis("off")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.02)
        bar.set_label("|∂x̂₀(centre)/∂x| / its max", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title + ': ' if title else ''}gradient of the centre output pixel; cyan square: P{pct} "
                 f"without centre, the smallest centred square holding {pct}% of the mass", fontsize=8)
    return fig


def size_figure(result: ReceptiveFieldResult, title: str = ""):
    """Effective receptive-field sizes against ᾱ, in the table's names (P90, and 2·r90 + 1 for the radius)."""
    from ..plotting import select_backend

    select_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    pct = int(result.mass * 100)
    ax.plot(result.alpha_bars, result.patch_size, "o-", label=f"P{pct}")
    ax.plot(result.alpha_bars, result.patch_size_without_centre, "s--", label=f"P{pct} without centre")
    ax.plot(result.alpha_bars, 2 * result.radius_without_centre + 1, "^:",
            label=f"2·r{pct} + 1 without centre (disc)")
    ax.set_xlabel("ᾱ (noise level; 1 = clean)")
    ax.set_ylabel("effective receptive field (pixels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title + chr(10) if title else ''}P{pct}: side of the smallest centred square holding "
                 f"{pct}% of |∂x̂₀/∂x|", fontsize=8)
    return fig


def save_receptive_field(result: ReceptiveFieldResult, run: RunDir, title: str = "") -> None:
    """receptive_field.npz (maps and sizes), receptive_field.csv/.md, receptive_field.png, receptive_field_size.png."""
    run.save_arrays("receptive_field", alpha_bars=result.alpha_bars, maps=result.maps,
                    centre=np.array(result.centre), radius=result.radius, patch_size=result.patch_size,
                    radius_without_centre=result.radius_without_centre,
                    patch_size_without_centre=result.patch_size_without_centre)
    run.save_table("receptive_field", result.rows(),
                   title=f"effective receptive field ({int(result.mass * 100)}% of the gradient mass, "
                         f"{result.n} inputs, {result.method})")
    run.save_figure("receptive_field", heatmap_figure(result, title))
    run.save_figure("receptive_field_size", size_figure(result, title))
