"""Figures of the criticality analysis (ambrogioni-phase-transitions-full.txt, Fig. 2/3/5–7).

- `snapshot_figure`: the patch dictionary (when there is one) above snapshots of one reverse trajectory at
  log-spaced times (Fig. 2 / 5).
- `criticality_figure`: three panels against t (log axis): ξ_x(t) per trajectory (transparent blue) with their
  median (black) and ξ_eq(t) rescaled to ξ_x's range (dashed red; E.11); −dξ_x/d log t; |λ_n(t)| of the drift
  along several Fourier modes (transparent) and their median (black) (Fig. 3, 6, 7). Vertical lines mark the
  theory's t_c (dashed) and the measured argmax of the median ξ_eq (dotted); a grey band the window where the
  median λ_0 ≤ 0 (no real ξ_eq).
- `xi_eq_figure`: ξ_eq(t) itself (log axis), per trajectory and median, t_c marked.
All take numpy arrays or tensors; time runs right to left in the reverse process.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .criticality import XI_EQ_MIN_FRACTION
from .figures import _pyplot

TRAJECTORY_COLOUR = "tab:blue"
XI_EQ_COLOUR = "tab:red"


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _median(a: np.ndarray, min_fraction: float = 0.0) -> np.ndarray:
    """NaN-ignoring median over axis 0 of [N, T], NaN where fewer than max(1, min_fraction·N) values are finite
    (as `criticality.median_curve`), without warnings."""
    out = np.full(a.shape[1:], np.nan)
    ok = np.isfinite(a).sum(axis=0) >= max(1.0, min_fraction * a.shape[0])
    if ok.any():
        out[ok] = np.nanmedian(a[:, ok], axis=0)
    return out


def _mark(ax: Any, t_c: float | None, t_measured: float | None,
          window: tuple[float, float] | None = None) -> None:
    if window is not None and all(np.isfinite(window)):
        ax.axvspan(min(window), max(window), color="0.5", alpha=0.12, lw=0, label="median λ_0 ≤ 0")
    if t_c is not None and np.isfinite(t_c):
        ax.axvline(t_c, color="k", ls="--", lw=1, label=f"theory t_c = {t_c:.3g}")
    if t_measured is not None and np.isfinite(t_measured):
        ax.axvline(t_measured, color=XI_EQ_COLOUR, ls=":", lw=1.2, label=f"argmax median ξ_eq = {t_measured:.3g}")


def _frame(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


MAX_PATTERNS_SHOWN = 16


def snapshot_figure(snapshots: Any, times: Sequence[float], patterns: Any | None = None,
                    title: str | None = None) -> Any:
    """Fig. 2 / 5: snapshots [S, C, H, W] of one trajectory at `times` (first channel, grey, [−1, 1] → black to
    white, values clipped) with, when given, the dictionary patterns [K, P, P] or [K, C, P, P] in a row above."""
    plt = _pyplot()
    snaps = _np(snapshots)
    s = snaps.shape[0]
    pats = None if patterns is None else _np(patterns)
    if pats is not None and pats.ndim == 4:
        pats = pats[:, 0]
    total_patterns = 0 if pats is None else len(pats)
    if pats is not None:
        pats = pats[:MAX_PATTERNS_SHOWN]        # a layout of hundreds of axes takes minutes and reads as noise
    fig = plt.figure(figsize=(2.2 * max(s, 4), 2.6 + (1.6 if pats is not None else 0)), constrained_layout=True)
    if pats is not None:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1, 2.2])
        axes = top.subplots(1, len(pats), squeeze=False)[0]
        for k, p in enumerate(pats):
            axes[k].imshow(p, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            axes[k].set_title(f"p{k + 1}", fontsize=8)
            _frame(axes[k])
        shown = "" if len(pats) == total_patterns else f" (the first {len(pats)} of {total_patterns})"
        top.suptitle(f"patch dictionary{shown}", fontsize=9)
    else:
        bottom = fig
    row = bottom.subplots(1, s, squeeze=False)[0]
    for j in range(s):
        row[j].imshow(np.clip(snaps[j, 0], -1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        row[j].set_title(f"t = {times[j]:.3g}", fontsize=9)
        _frame(row[j])
    if title:
        bottom.suptitle(title, fontsize=10)
    return fig


def criticality_figure(t: Any, xi: Any, growth: Any, soft_t: Any, xi_eq: Any, abs_lambda: Any,
                       t_c: float | None = None, t_measured: float | None = None,
                       title: str | None = None, window: tuple[float, float] | None = None) -> Any:
    """Fig. 3 / 6 / 7. t [T] grid times; xi, growth [N, T] (ξ_x and −dξ_x/d log t); soft_t [S] the times of the
    drift analysis; xi_eq [N, S]; abs_lambda [N, S, M] |λ| along M Fourier modes. ξ_eq is rescaled so that its
    median's largest finite value matches the largest median ξ_x (App. E.11)."""
    plt = _pyplot()
    t, xi, growth = _np(t), _np(xi), _np(growth)
    soft_t, xi_eq, lam = _np(soft_t), _np(xi_eq), _np(abs_lambda)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0), constrained_layout=True)
    ax = axes[0]
    for curve in xi:
        ax.plot(t, curve, color=TRAJECTORY_COLOUR, alpha=0.25, lw=0.8)
    med_xi = _median(xi)
    ax.plot(t, med_xi, color="k", lw=1.6, label="median ξ_x")
    med_eq = _median(xi_eq, XI_EQ_MIN_FRACTION)
    if np.isfinite(med_eq).any() and np.isfinite(med_xi).any() and np.nanmax(med_eq) > 0:
        scale = np.nanmax(med_xi) / np.nanmax(med_eq)
        for curve in xi_eq:
            ax.plot(soft_t, scale * curve, color=XI_EQ_COLOUR, alpha=0.2, lw=0.7, ls="--")
        ax.plot(soft_t, scale * med_eq, color=XI_EQ_COLOUR, lw=1.4, ls="--", label=f"median ξ_eq × {scale:.3g}")
    finite_xi = xi[np.isfinite(xi)]
    if finite_xi.size and finite_xi.max() > 0:
        ax.set_ylim(0, 1.15 * finite_xi.max())                          # ξ_eq spikes of single trajectories clip
    ax.set_ylabel("correlation length ξ_x (pixels)")
    ax.set_title("ξ_x(t) and rescaled ξ_eq(t)", fontsize=10)
    ax = axes[1]
    for curve in growth:
        ax.plot(t, curve, color=TRAJECTORY_COLOUR, alpha=0.25, lw=0.8)
    ax.plot(t, _median(growth), color="k", lw=1.6, label="median")
    ax.set_ylabel("−dξ_x / d log t")
    ax.set_title("growth rate of ξ_x (Gaussian-smoothed, E.7)", fontsize=10)
    ax = axes[2]
    flat = lam.transpose(0, 2, 1).reshape(-1, lam.shape[1]) if lam.ndim == 3 else lam
    for curve in flat:
        ax.plot(soft_t, curve, color=TRAJECTORY_COLOUR, alpha=0.08, lw=0.6)
    ax.plot(soft_t, _median(flat), color="k", lw=1.6, label="median over modes")
    ax.set_yscale("log")
    ax.set_ylabel("|λ_v| (drift along cos modes)")
    ax.set_title("mode softening (E.8–E.9)", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("t (reverse process runs right → left)")
        ax.grid(alpha=0.3)
        _mark(ax, t_c, t_measured, window)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[2].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def xi_eq_figure(soft_t: Any, xi_eq: Any, t_c: float | None = None, t_measured: float | None = None,
                 title: str | None = None, window: tuple[float, float] | None = None) -> Any:
    """ξ_eq(t) per trajectory (transparent) and its median (dashed red), log axes, t_c marked (App. E.10–E.12)."""
    plt = _pyplot()
    soft_t, xi_eq = _np(soft_t), _np(xi_eq)
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for curve in xi_eq:
        ax.plot(soft_t, curve, color=XI_EQ_COLOUR, alpha=0.25, lw=0.7)
    ax.plot(soft_t, _median(xi_eq, XI_EQ_MIN_FRACTION), color=XI_EQ_COLOUR, lw=1.6, ls="--", label="median ξ_eq")
    ax.set_xscale("log")
    finite = xi_eq[np.isfinite(xi_eq)]
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("ξ_eq (pixels), fit of λ_n/λ_0 = 1 + ξ²(nk)², n = 1..3")
    ax.grid(alpha=0.3)
    _mark(ax, t_c, t_measured, window)
    ax.legend(fontsize=8)
    ax.set_title(title or "equilibrium correlation length", fontsize=10)
    return fig


__all__ = ["criticality_figure", "snapshot_figure", "xi_eq_figure"]
