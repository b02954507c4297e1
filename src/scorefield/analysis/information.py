"""Information spreading along the reverse process (EFT paper, eft-information-spreading.txt).

Observables of an ensemble of reverse trajectories φ(·, t) started from independent noise:

    G_t(x, y) = ⟨φ(x)φ(y)⟩ − ⟨φ(x)⟩⟨φ(y)⟩               connected two-point function (eq. 4)
    ρ(x, y; t) = G_t(x, y) / √(G_t(x, x) G_t(y, y))      correlation coefficient (eq. 6)
    I(x, y; t) = −½ log(1 − ρ²)                         Gaussian mutual information, in nats (eq. 5)

and the test of the diffusive regime (eq. 9–10): curves ρ_t(|x−y|) at many times fall on one curve against
the self-similar variable |x−y|²/ᾱ_t. Near ᾱ → 1 the snapping regime (eq. 8) takes over.

Pipeline: `record` runs any denoiser (analytic machine or trained network, through the sampler callback) and
streams, batch by batch, the moments these need into a `Trajectory` — never the ensemble itself:

    Σ x(p)                  [K, T, C, H, W]      per block k of samples, per recorded time
    Σ x(p)²                 [K, T, C, H, W]
    Σ Σ_p x(p) x(p+δ)       [K, T, C, H, W]      circular autocorrelation (FFT), for translation averages
    Σ x(a) x(p)             [K, T, A, C, H, W]   from A anchor pixels a to every pixel p, same channel

Samples are split into K contiguous blocks (sample i is in block ⌊iK/N⌋), so the block sums, not the samples,
are what the bootstrap resamples. `two_point` turns moments into ρ and I as functions of the separation,
`collapse` / `collapse_by_time` measure the curve collapse, `snapping` compares late trajectories with
closed-form relaxations to the nearest bank patch, and `information_figure` draws the paper's Fig. 2/3.

Readings of the paper. Eq. 4 writes the subtracted term as E[φ_t]², eq. 6 divides by one variance
E[φ²] − E[φ]²: both assume a stationary ensemble. The anchor path uses the general forms above (each pixel's own
mean and variance); the translation path averages over positions, where they coincide. Eq. 8 as printed makes
the distance to the nearest patch grow like 1/ε (ε = 1 − ᾱ); DDIM trajectories instead follow the probability-flow
relaxation φ − √ᾱ φ* ∝ √ε (see `snap_prediction`, which offers both and eq. 1's own leading order).
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sampling import default_grid, sample
from ..schedules import get_schedule

Tensor = torch.Tensor

DEFAULT_BLOCKS = 20
# ρ² is clipped to this before −½ log(1 − ρ²): |ρ| = 1 to rounding (perfectly correlated pixels, ρ(0)) would
# give an infinite information; the cap is I ≤ −½ log(1e-12) ≈ 13.8 nats.
RHO2_MAX = 1.0 - 1e-12
# Below this ᾱ a state is pure noise to float64 (the cosine schedule's first DDIM state has ᾱ ≈ 4e-33): its
# curve is ≈ 0 and its |x−y|²/ᾱ lies far beyond every other curve's, so `collapse` leaves it out by default.
ALPHA_BAR_FLOOR = 1e-6
VARIABLES = ("r2_over_alpha_bar", "r")
QUANTITIES = ("rho", "mi")
SNAP_FORMS = ("eq8", "eq1", "probability_flow")
_MOMENTS = ("sum_x", "sum_xx", "sum_auto", "sum_anchor")
_BOOTSTRAP_DOUBLES = 2**23          # replicates are evaluated in chunks of about this many float64 values


class InformationError(ValueError):
    """Invalid input to an information-spreading analysis."""


# ---- the moments ---------------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    """Streamed ensemble moments at T recorded times of the reverse process, in K blocks of samples (float64).

    t, alpha_bar, steps [T] are the recorded grid times, their ᾱ and sampler step indices, in process order
    (noise first). anchors [A, 2] are the (y, x) anchor pixels; block_n [K] the samples per block. Moment
    arrays (module docstring): sum_x, sum_xx, sum_auto [K, T, C, H, W] and sum_anchor [K, T, A, C, H, W];
    sum_auto[k, i, c, dy, dx] = Σ_samples Σ_p x_c(p) x_c(p + δ) with δ = (dy, dx) taken modulo (H, W).
    meta: plain data describing how the moments were made (sampler, schedule, model, ...)."""

    t: np.ndarray
    alpha_bar: np.ndarray
    steps: np.ndarray
    anchors: np.ndarray
    block_n: np.ndarray
    sum_x: np.ndarray
    sum_xx: np.ndarray
    sum_auto: np.ndarray
    sum_anchor: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of samples in the ensemble."""
        return int(self.block_n.sum())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.sum_x.shape[2:])

    @property
    def blocks(self) -> int:
        return int(self.block_n.shape[0])

    def totals(self) -> dict[str, np.ndarray]:
        """The moments summed over blocks: {"sum_x": [T, C, H, W], ..., "sum_anchor": [T, A, C, H, W]}."""
        return {name: getattr(self, name).sum(0) for name in _MOMENTS}

    def save(self, path: str | Path) -> Path:
        """Write every array and the metadata to one .npz file (atomically); `Trajectory.load` reads it back."""
        from ..runs import atomic_write_bytes

        path = Path(path)
        path = path if path.suffix == ".npz" else path.with_suffix(".npz")
        buf = io.BytesIO()
        np.savez(buf, t=self.t, alpha_bar=self.alpha_bar, steps=self.steps, anchors=self.anchors,
                 block_n=self.block_n, **{name: getattr(self, name) for name in _MOMENTS},
                 meta=np.array(json.dumps(self.meta, default=repr)))
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        with np.load(Path(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        return cls(**arrays, meta=meta)

    def merge(self, other: Trajectory) -> Trajectory:
        """The moments of both ensembles together (their blocks concatenated): record an ensemble in parts,
        save each, merge them. Both must share times, anchors and image shape (their noise must differ)."""
        same = (self.image_shape == other.image_shape and np.array_equal(self.steps, other.steps)
                and np.allclose(self.alpha_bar, other.alpha_bar, rtol=1e-12, atol=0)
                and np.array_equal(self.anchors, other.anchors))
        if not same:
            raise InformationError("trajectories to merge must share image shape, recorded steps, ᾱ and anchors")
        cat = {name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in _MOMENTS}
        meta = {**self.meta, "merged": [self.meta, other.meta]}
        return Trajectory(self.t.copy(), self.alpha_bar.copy(), self.steps.copy(), self.anchors.copy(),
                          np.concatenate([self.block_n, other.block_n]), **cat, meta=meta)


def default_anchors(height: int, width: int) -> list[tuple[int, int]]:
    """The centre pixel and a corner-ish pixel (one eighth of the way in): for zero-padded models, one anchor far
    from the border and one near it."""
    anchors = [(height // 2, width // 2), (height // 8, width // 8)]
    return list(dict.fromkeys(anchors))


def _check_anchors(anchors: Any, height: int, width: int) -> np.ndarray:
    """anchors as an int64 [A, 2] array of distinct in-image (y, x) pixels, or InformationError naming them."""
    try:
        arr = np.asarray(anchors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InformationError(f"anchors must be a list of (y, x) pixel pairs, got {anchors!r}") from exc
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise InformationError(f"anchors must be a non-empty list of (y, x) pixel pairs, got {anchors!r}")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise InformationError(f"anchors must be integer pixel coordinates, got {anchors!r}")
    arr = arr.astype(np.int64)
    outside = (arr[:, 0] < 0) | (arr[:, 0] >= height) | (arr[:, 1] < 0) | (arr[:, 1] >= width)
    if outside.any():
        raise InformationError(f"anchors {arr[outside].tolist()} lie outside the {height}×{width} image "
                               f"(y in [0, {height - 1}], x in [0, {width - 1}])")
    if len({tuple(a) for a in arr.tolist()}) != len(arr):
        raise InformationError(f"anchors must be distinct, got {arr.tolist()}")
    return arr


def _block_of(n: int, blocks: int) -> Tensor:
    """Block index [n] of each sample: K = min(blocks, n) contiguous blocks of (nearly) equal size."""
    k = min(int(blocks), n)
    return torch.arange(n, dtype=torch.int64) * k // n


class _Accumulator:
    """Streamed block sums of the moments at T times; `add` folds in one batch of states at one time.

    The autocorrelation is accumulated as the power spectrum Σ|x̂(k)|² and transformed back once at the end
    (the inverse FFT is linear, so Σ_b ifft(|x̂_b|²) = ifft(Σ_b |x̂_b|²))."""

    def __init__(self, n: int, times: int, image_shape: Sequence[int], anchors: np.ndarray, blocks: int,
                 device: torch.device) -> None:
        self.device = torch.device("cpu") if device.type == "mps" else device     # MPS has no float64
        self.block = _block_of(n, blocks).to(self.device)                        # [N]
        k = int(self.block.max()) + 1
        c, h, w = image_shape
        self.shape = (h, w)
        self.anchors = torch.as_tensor(anchors, dtype=torch.int64, device=self.device)   # [A, 2]
        zeros = dict(dtype=torch.float64, device=self.device)
        self.sum_x = torch.zeros(k, times, c, h, w, **zeros)
        self.sum_xx = torch.zeros(k, times, c, h, w, **zeros)
        self.sum_power = torch.zeros(k, times, c, h, w // 2 + 1, **zeros)      # Σ |rfft2(x)|²
        self.sum_anchor = torch.zeros(k, times, len(anchors), c, h, w, **zeros)

    def add(self, slot: int, x: Tensor, sample_index: Tensor) -> None:
        """Fold states x [B, C, H, W] of samples sample_index [B] into the sums of time slot `slot`."""
        x = x.to(device=self.device, dtype=torch.float64)                     # [B, C, H, W]
        blk = self.block[sample_index.to(self.device)]                        # [B]
        spectrum = torch.fft.rfft2(x)
        power = spectrum.real**2 + spectrum.imag**2                           # [B, C, H, W//2+1]
        at_anchor = x[:, :, self.anchors[:, 0], self.anchors[:, 1]]           # [B, C, A]
        for k in torch.unique(blk).tolist():
            sel = blk == k
            xs = x[sel]
            self.sum_x[k, slot] += xs.sum(0)
            self.sum_xx[k, slot] += (xs * xs).sum(0)
            self.sum_power[k, slot] += power[sel].sum(0)
            self.sum_anchor[k, slot] += torch.einsum("bca,bchw->achw", at_anchor[sel], xs)

    @property
    def sum_auto(self) -> Tensor:
        """Σ_samples Σ_p x(p) x(p+δ) [K, T, C, H, W] (δ modulo (H, W))."""
        return torch.fft.irfft2(self.sum_power, s=self.shape)

    def trajectory(self, t: Sequence[float], alpha_bar: Sequence[float], steps: Sequence[int],
                   meta: dict[str, Any]) -> Trajectory:
        block_n = torch.bincount(self.block.cpu(), minlength=self.sum_x.shape[0]).numpy().astype(np.int64)
        return Trajectory(np.asarray(t, dtype=np.float64), np.asarray(alpha_bar, dtype=np.float64),
                          np.asarray(steps, dtype=np.int64), self.anchors.cpu().numpy(), block_n,
                          **{name: getattr(self, name).cpu().numpy() for name in _MOMENTS}, meta=meta)


def moments_from_samples(samples: Any, t: Sequence[float] | float | None = None,
                         alpha_bar: Sequence[float] | float | None = None, anchors: Any = None,
                         blocks: int = DEFAULT_BLOCKS, batch_size: int = 256) -> Trajectory:
    """The `Trajectory` of a given ensemble: samples [N, C, H, W] (one time) or [T, N, C, H, W] (T times).

    t / alpha_bar: the times and ᾱ to attach, one per time (default t = 0, ᾱ = 1: data, the end of the reverse
    process). Used to analyse stored samples, training data or fields with a known spectrum like any recording."""
    x = torch.as_tensor(samples.detach().cpu() if isinstance(samples, Tensor) else np.asarray(samples))
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] < 2 or not x.is_floating_point():
        raise InformationError(f"samples must be a float [N, C, H, W] or [T, N, C, H, W] tensor with N ≥ 2, got "
                               f"{tuple(x.shape)} {x.dtype}")
    if not torch.isfinite(x).all():
        raise InformationError("samples contain NaN or infinite values")
    n_times, n = x.shape[:2]
    t_arr = np.zeros(n_times) if t is None else np.atleast_1d(np.asarray(t, dtype=np.float64))
    ab_arr = np.ones(n_times) if alpha_bar is None else np.atleast_1d(np.asarray(alpha_bar, dtype=np.float64))
    if t_arr.shape != (n_times,) or ab_arr.shape != (n_times,):
        raise InformationError(f"t and alpha_bar need one value per time ({n_times}), got {t_arr.shape} and "
                               f"{ab_arr.shape}")
    h, w = x.shape[-2:]
    anchor_arr = _check_anchors(default_anchors(h, w) if anchors is None else anchors, h, w)
    _check_positive("blocks", blocks)
    _check_positive("batch_size", batch_size)
    acc = _Accumulator(n, n_times, x.shape[2:], anchor_arr, blocks, torch.device("cpu"))
    for i in range(n_times):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            acc.add(i, x[i, start:stop], torch.arange(start, stop))
    return acc.trajectory(t_arr, ab_arr, np.arange(n_times), {"source": "moments_from_samples", "n": n})


# ---- recording the reverse process -----------------------------------------------------------------------------

def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InformationError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_noise(model: Any, noise: Any) -> Tensor:
    if not isinstance(noise, Tensor) or noise.ndim != 4:
        shape = tuple(noise.shape) if hasattr(noise, "shape") else type(noise).__name__
        raise InformationError(f"noise must be a [N, C, H, W] tensor, got {shape}")
    if noise.shape[0] < 2:
        raise InformationError(f"noise must hold at least 2 samples for ensemble moments, got N = {noise.shape[0]}")
    if not noise.is_floating_point():
        raise InformationError(f"noise must be a floating-point tensor, got {noise.dtype}")
    # channels must match; the lattice size is the model's business (the tanh machine runs on any size)
    expected = getattr(model, "image_shape", None)
    if expected is not None and noise.shape[1] != expected[0]:
        raise InformationError(f"noise has {noise.shape[1]} channels ([N, C, H, W] = {tuple(noise.shape)}), the "
                               f"model expects {expected[0]}")
    return noise


def select_steps(grid: Tensor, times: Sequence[float] | None) -> list[int]:
    """Sampler step indices (into the descending grid [n+1]; step n is the final state) nearest to each of
    `times`, in process order without repeats; None: every step. Times outside the grid are refused."""
    ts = np.asarray(torch.as_tensor(grid, dtype=torch.float64).cpu(), dtype=np.float64)
    if times is None:
        return list(range(len(ts)))
    req = np.atleast_1d(np.asarray(times, dtype=np.float64))
    if req.size == 0:
        raise InformationError("times is empty: give at least one time t of the sampler's grid (or None for all)")
    lo, hi = ts.min(), ts.max()
    tol = 1e-9 * max(hi - lo, 1e-300)
    bad = ~np.isfinite(req) | (req < lo - tol) | (req > hi + tol)
    if bad.any():
        raise InformationError(f"times {req[bad].tolist()} lie outside the sampler's grid [{lo:.6g}, {hi:.6g}]")
    return sorted({int(np.abs(ts - v).argmin()) for v in req})


def _sampler_grid(steps: int, schedule: Any, sampler: str, grid: str | None, ts: Any) -> tuple[Any, Tensor]:
    sched = get_schedule(schedule)
    grid_t = ts if ts is not None else default_grid(sched, steps, sampler, grid)
    return sched, torch.as_tensor(grid_t, dtype=torch.float64)


def _run_batches(model: Any, noise: Tensor, chosen: list[int], grid_t: Tensor, sched: Any, sampler: str,
                 labels: Any, seeds: Sequence[int] | None, batch_size: int, progress: bool,
                 on_state: Callable[[int, Tensor, Tensor], None], sample_options: dict[str, Any]) -> list[float]:
    """Run the sampler over `noise` in batches; call on_state(slot, x [B, C, H, W], sample indices [B]) at every
    chosen step. Returns the ᾱ the sampler reported at each chosen step."""
    n = noise.shape[0]
    slot_of = {step: i for i, step in enumerate(chosen)}
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise InformationError(f"seeds must give one seed per sample ({n}), got {len(seeds)}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != n:
            raise InformationError(f"labels must give one label per sample ({n}), got {labels.shape[0]}")
    alpha_bars = [math.nan] * len(chosen)
    for start in tqdm(range(0, n, batch_size), desc="record", disable=not progress):
        stop = min(start + batch_size, n)
        index = torch.arange(start, stop)

        def callback(info: dict[str, Any], index: Tensor = index) -> None:
            slot = slot_of.get(int(info["step"]))
            if slot is not None:
                alpha_bars[slot] = float(info["alpha_bar"])
                on_state(slot, info["x"], index)

        sample(model, noise[start:stop], sampler=sampler, schedule=sched, ts=grid_t, callback=callback,
               labels=None if labels is None else labels[start:stop].to(noise.device), seeds=seeds[start:stop],
               **sample_options)
    return alpha_bars


def record(model: Any, noise: Tensor, times: Sequence[float] | None = None, steps: int = 20,
           schedule: Any = "cosine", sampler: str = "ddim", labels: Any = None, batch_size: int = 64,
           progress: bool = True, anchors: Any = None, blocks: int = DEFAULT_BLOCKS,
           seeds: Sequence[int] | None = None, grid: str | None = None, ts: Any = None,
           **sample_options: Any) -> Trajectory:
    """Run the reverse process of `model` from noise [N, C, H, W] in batches and stream the two-point moments.

    Any denoiser works (model(x, ᾱ, labels) → x̂₀): the states come from `sampling.sample`'s callback.
    times: t values of the sampler's grid (steps, schedule, sampler, grid or an explicit ts, exactly as
    `sampling.sample` builds it); each is replaced by the nearest grid time, which is what the result reports;
    None records every step including the final state. anchors: (y, x) pixels for the anchor moments (default
    `default_anchors`); blocks: bootstrap blocks K (≤ N). seeds: one per sample for stochastic samplers (default
    0..N−1, so nothing depends on batch_size). Memory is that of the moments, O(K·T·(3 + A)·C·H·W), whatever N.
    """
    noise = _check_noise(model, noise)
    batch_size = _check_positive("batch_size", batch_size)
    blocks = _check_positive("blocks", blocks)
    _check_positive("steps", steps)
    n, (c, h, w) = noise.shape[0], noise.shape[1:]
    anchor_arr = _check_anchors(default_anchors(h, w) if anchors is None else anchors, h, w)
    sched, grid_t = _sampler_grid(steps, schedule, sampler, grid, ts)
    chosen = select_steps(grid_t, times)
    acc = _Accumulator(n, len(chosen), (c, h, w), anchor_arr, blocks, noise.device)
    alpha_bars = _run_batches(model, noise, chosen, grid_t, sched, sampler, labels, seeds, batch_size, progress,
                              acc.add, sample_options)
    meta = {"source": "record", "model": getattr(model, "name", type(model).__name__),
            "model_config": getattr(model, "config", {}), "sampler": sampler,
            "schedule": getattr(sched, "name", str(schedule)), "steps": len(grid_t) - 1, "n": n,
            "grid": grid_t.tolist(), "noise_dtype": str(noise.dtype).replace("torch.", ""),
            "sample_options": sample_options}
    return acc.trajectory(grid_t[chosen].tolist(), alpha_bars, chosen, meta)


# ---- ρ and I as functions of separation -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Bins:
    """Pairs grouped by exact squared distance: `order` lists flat pixel indices bin after bin (distance 0
    excluded); bin r starts at starts[r] and holds counts[r] of them; d2 [R] are the squared distances."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    d2: np.ndarray

    @classmethod
    def of(cls, d2_flat: np.ndarray) -> _Bins:
        keep = np.flatnonzero(d2_flat > 0)
        order = keep[np.argsort(d2_flat[keep], kind="stable")]
        d2, starts, counts = np.unique(d2_flat[order], return_index=True, return_counts=True)
        return cls(order, starts, counts, d2)

    def mean(self, values: np.ndarray) -> np.ndarray:
        """Bin averages of values [..., P] (P flat pixels) -> [..., R]."""
        return np.add.reduceat(values[..., self.order], self.starts, axis=-1) / self.counts


def periodic_d2(height: int, width: int) -> np.ndarray:
    """Squared minimum-image length of each lattice displacement δ = (dy, dx) modulo (H, W): [H, W] (int)."""
    dy = np.minimum(np.arange(height), height - np.arange(height))
    dx = np.minimum(np.arange(width), width - np.arange(width))
    return dy[:, None] ** 2 + dx[None, :] ** 2


def radial_average(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Average a function of the periodic displacement, values [..., H, W] (δ modulo (H, W), fft order), over
    displacements of equal minimum-image length: (separation [R], averages [..., R]), separation 0 excluded."""
    v = np.asarray(values, dtype=np.float64)
    bins = _Bins.of(periodic_d2(*v.shape[-2:]).reshape(-1))
    return np.sqrt(bins.d2), bins.mean(v.reshape(*v.shape[:-2], -1))


def gaussian_information(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(I, clipped) with I = −½ log(1 − ρ²) (eq. 5) in nats, ρ² clipped to RHO2_MAX first (|ρ| = 1 up to rounding
    would be infinite); clipped marks the entries where the clip acted. NaN ρ gives NaN I."""
    rho2 = np.square(rho)
    clipped = rho2 > RHO2_MAX
    return -0.5 * np.log1p(-np.minimum(rho2, RHO2_MAX)), clipped


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den ≤ 0 or is not finite (a pixel without variance has no correlation coefficient)."""
    ok = np.isfinite(den) & (den > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, num / np.where(ok, den, 1.0), np.nan)


def _translation_rho(n: np.ndarray, sum_x: np.ndarray, sum_auto: np.ndarray) -> np.ndarray:
    """Translation-averaged ρ(δ) [..., T, C, H, W] from moment sums [..., T, C, H, W] of n [...] samples.

    Ḡ(δ) = (1/HW) Σ_p G(p, p+δ) (eq. 4) = (1/HW)[Σ Σ_p x(p)x(p+δ)/n − Σ_p m(p)m(p+δ)], with m the ensemble mean;
    ρ(δ) = Ḡ(δ)/Ḡ(0) (eq. 6 for a stationary ensemble, whose G(x, x) = G(y, y) = Ḡ(0) — the paper's own
    denominator E[φ²] − E[φ]²). Per channel."""
    n = n.reshape(n.shape + (1,) * 4)
    m = sum_x / n                                                          # [..., T, C, H, W]
    h, w = m.shape[-2:]
    spec = np.fft.rfft2(m)
    mean_auto = np.fft.irfft2(spec.real**2 + spec.imag**2, s=(h, w))      # Σ_p m(p) m(p+δ)
    g = (sum_auto / n - mean_auto) / (h * w)                              # [..., T, C, H, W]
    return _safe_ratio(g, g[..., :1, :1])


def _anchor_rho(n: np.ndarray, sum_x: np.ndarray, sum_xx: np.ndarray, sum_anchor: np.ndarray,
                anchors: np.ndarray) -> np.ndarray:
    """ρ(a, p) = G(a, p)/√(G(a, a) G(p, p)) (eq. 4, 6) [..., T, A, C, H, W] from moment sums of n [...] samples;
    sum_anchor [..., T, A, C, H, W] holds the anchors `anchors` [A, 2] in that order."""
    n = n.reshape(n.shape + (1,) * 4)
    m = sum_x / n                                                          # [..., T, C, H, W]
    var = sum_xx / n - m * m                                               # G(p, p)
    m_a = np.moveaxis(m[..., anchors[:, 0], anchors[:, 1]], -1, -2)        # [..., T, A, C]
    var_a = np.moveaxis(var[..., anchors[:, 0], anchors[:, 1]], -1, -2)    # [..., T, A, C]
    g = sum_anchor / n[..., None] - m_a[..., None, None] * m[..., None, :, :, :]   # [..., T, A, C, H, W]
    return _safe_ratio(g, np.sqrt(np.clip(var_a[..., None, None] * var[..., None, :, :, :], 0, None)))


class _TranslationCurves:
    """ρ and I against the minimum-image separation |δ|, from the autocorrelation moments."""

    def __init__(self, image_shape: Sequence[int]) -> None:
        self.bins = _Bins.of(periodic_d2(*image_shape[-2:]).reshape(-1))
        self.separation, self.pairs = np.sqrt(self.bins.d2), self.bins.counts.copy()

    def __call__(self, n: np.ndarray, m: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rho = _translation_rho(n, m["sum_x"], m["sum_auto"])                # [..., T, C, H, W]
        rho = rho.reshape(*rho.shape[:-2], -1)                             # [..., T, C, P]
        mi, clipped = gaussian_information(rho)
        return (self.bins.mean(rho).mean(-2), self.bins.mean(mi).mean(-2),  # [..., T, R]
                clipped[..., self.bins.order].sum(axis=(-1, -2)))


class _AnchorCurves:
    """ρ and I against the Euclidean distance from each anchor (no wrap), binned per anchor, averaged over
    the anchors that have pixels at that distance."""

    def __init__(self, image_shape: Sequence[int], recorded: np.ndarray, chosen: np.ndarray) -> None:
        h, w = image_shape[-2:]
        lookup = {tuple(a): i for i, a in enumerate(recorded.tolist())}
        missing = [a for a in chosen.tolist() if tuple(a) not in lookup]
        if missing:
            raise InformationError(f"anchors {missing} were not recorded; the trajectory holds "
                                   f"{recorded.tolist()} (pass them to record(..., anchors=...))")
        self.index = np.array([lookup[tuple(a)] for a in chosen.tolist()], dtype=np.int64)
        self.anchors = chosen
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        self.bins = [_Bins.of(((yy - ay) ** 2 + (xx - ax) ** 2).reshape(-1)) for ay, ax in chosen.tolist()]
        d2 = np.unique(np.concatenate([b.d2 for b in self.bins]))
        self.slots = [np.searchsorted(d2, b.d2) for b in self.bins]
        self.separation = np.sqrt(d2)
        self.pairs = np.zeros(len(d2), dtype=np.int64)
        for b, s in zip(self.bins, self.slots, strict=True):
            self.pairs[s] += b.counts

    def __call__(self, n: np.ndarray, m: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rho = _anchor_rho(n, m["sum_x"], m["sum_xx"], m["sum_anchor"][..., self.index, :, :, :], self.anchors)
        rho = rho.reshape(*rho.shape[:-2], -1)                             # [..., T, A, C, P]
        mi, clipped = gaussian_information(rho)
        shape = (*rho.shape[:-3], len(self.separation))
        rho_sum, mi_sum, count = np.zeros(shape), np.zeros(shape), np.zeros(len(self.separation))
        for a, (bins, slot) in enumerate(zip(self.bins, self.slots, strict=True)):
            rho_sum[..., slot] += bins.mean(rho[..., a, :, :]).mean(-2)
            mi_sum[..., slot] += bins.mean(mi[..., a, :, :]).mean(-2)
            count[slot] += 1
        clipped_count = sum(clipped[..., a, :, :][..., b.order].sum(axis=(-1, -2)) for a, b in enumerate(self.bins))
        return rho_sum / count, mi_sum / count, clipped_count


@dataclass
class TwoPoint:
    """ρ and the Gaussian mutual information I (nats) against separation (pixels) at T times.

    separation [R] (distance 0 excluded); rho, mi [T, R] and their bootstrap standard errors rho_err, mi_err
    [T, R] (NaN without bootstrap); t, alpha_bar, steps [T]; pairs [R]: displacement vectors (translation
    method) or anchor–pixel pairs (anchor method) averaged in each bin; method: 'translation' | 'anchors';
    clipped [T]: (pair, channel) entries whose ρ² was clipped to RHO2_MAX before the log (eq. 5)."""

    separation: np.ndarray
    rho: np.ndarray
    mi: np.ndarray
    t: np.ndarray
    alpha_bar: np.ndarray
    rho_err: np.ndarray | None = None
    mi_err: np.ndarray | None = None
    steps: np.ndarray | None = None
    pairs: np.ndarray | None = None
    method: str = "translation"
    anchors: np.ndarray | None = None
    n: int = 0
    bootstrap: int = 0
    clipped: np.ndarray | None = None

    def curves(self, quantity: str = "rho") -> np.ndarray:
        """rho or mi [T, R]."""
        _check_choice("quantity", quantity, QUANTITIES)
        return self.rho if quantity == "rho" else self.mi


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InformationError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def two_point(traj: Trajectory, anchors: Any = None, bootstrap: int = 200, seed: int = 0) -> TwoPoint:
    """ρ(|x−y|; t) (eq. 6) and I(|x−y|; t) = −½ log(1 − ρ²) (eq. 5) from a Trajectory's moments (eq. 4).

    anchors=None: translation average over every pair at displacement δ on the periodic lattice, ρ(δ) = Ḡ(δ)/Ḡ(0)
    (see `_translation_rho`), binned by the exact minimum-image length |δ| — for translation-equivariant
    (circular) models. anchors=[(y, x), ...] (recorded ones) or "recorded" (all of them): ρ between each anchor
    and every pixel with each pixel's own variance, binned by the Euclidean distance from the anchor, the bins
    then averaged over anchors — for models without translation symmetry (zero padding).
    In every bin, ρ and I are averaged over its pairs and the channels (I of each pair's own ρ, not of the mean).
    ρ² is clipped to RHO2_MAX before the log (see `gaussian_information`); distance 0 (ρ = 1) is excluded.
    Error bars: standard deviation over `bootstrap` resamplings (with replacement) of the K recorded blocks.
    """
    if not isinstance(traj, Trajectory):
        raise InformationError(f"two_point needs a Trajectory (from record or moments_from_samples), got "
                               f"{type(traj).__name__}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise InformationError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    if anchors is None:
        curves: Any = _TranslationCurves(traj.image_shape)
    else:
        chosen = traj.anchors if isinstance(anchors, str) and anchors == "recorded" else \
            _check_anchors(anchors, *traj.image_shape[1:])
        curves = _AnchorCurves(traj.image_shape, traj.anchors, np.asarray(chosen, dtype=np.int64))
    totals = traj.totals()
    rho, mi, clipped = curves(np.asarray(float(traj.n)), totals)
    rho_err, mi_err = np.full_like(rho, np.nan), np.full_like(mi, np.nan)
    if bootstrap > 1 and traj.blocks > 1:
        rho_err, mi_err = _bootstrap(traj, curves, bootstrap, seed)
    return TwoPoint(curves.separation, rho, mi, traj.t.copy(), traj.alpha_bar.copy(), rho_err, mi_err,
                    traj.steps.copy(), curves.pairs, "translation" if anchors is None else "anchors",
                    None if anchors is None else curves.anchors, traj.n, int(bootstrap), clipped)


def _bootstrap(traj: Trajectory, curves: Any, replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard deviations [T, R] of ρ and I over resamplings of the K blocks (each replicate: K blocks drawn
    with replacement; its moments are the weighted block sums, its n the weighted block sizes)."""
    k = traj.blocks
    weights = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=replicates).astype(np.float64)
    per_replicate = sum(getattr(traj, name)[0].size for name in _MOMENTS)
    chunk = max(1, _BOOTSTRAP_DOUBLES // per_replicate)
    rhos, mis = [], []
    for start in range(0, replicates, chunk):
        wt = weights[start:start + chunk]                                    # [b, K]
        moments = {name: np.tensordot(wt, getattr(traj, name), axes=(1, 0)) for name in _MOMENTS}
        rho, mi, _ = curves(wt @ traj.block_n.astype(np.float64), moments)   # [b, T, R]
        rhos.append(rho)
        mis.append(mi)
    with np.errstate(invalid="ignore"):
        return np.std(np.concatenate(rhos), axis=0, ddof=1), np.std(np.concatenate(mis), axis=0, ddof=1)


# ---- curve collapse (eq. 10) -------------------------------------------------------------------------------------

def collapse_score(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], points: int = 32) -> float:
    """How far curves (xs[i], ys[i]) are from one curve, on the x range they all share.

    1. Keep each curve's finite points with x > 0. 2. The shared range is [max_i min x_i, min_i max x_i]; it
    must be non-empty. 3. On `points` log-spaced x_j across it, interpolate every curve linearly in log x.
    4. score = mean_j std_i y_i(x_j) / (max_j ȳ(x_j) − min_j ȳ(x_j)), ȳ the mean curve, std over curves
    (ddof 0): the typical spread around the mean curve in units of the mean curve's range there. 0 is a perfect
    collapse; dimensionless, so ρ and I give comparable numbers. A flat mean curve gives 0 if the curves agree,
    else inf."""
    cleaned = []
    for x, y in zip(xs, ys, strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
        order = np.argsort(x[ok])
        if order.size < 2:
            raise InformationError("every curve needs at least two finite points to be compared")
        cleaned.append((np.log(x[ok][order]), y[ok][order]))
    if len(cleaned) < 2:
        raise InformationError(f"a collapse compares at least two curves, got {len(cleaned)}")
    lo, hi = max(c[0][0] for c in cleaned), min(c[0][-1] for c in cleaned)
    if not lo < hi:
        raise InformationError(f"the curves share no range of the variable (need max of minima {math.exp(lo):.4g}"
                               f" < min of maxima {math.exp(hi):.4g}); compare fewer or closer times")
    grid = np.linspace(lo, hi, int(points))
    ys_on = np.stack([np.interp(grid, lx, y) for lx, y in cleaned])         # [curves, points]
    mean, spread = ys_on.mean(0), ys_on.std(0)
    span = mean.max() - mean.min()
    if span <= 0:
        return 0.0 if np.all(spread == 0) else math.inf
    return float(spread.mean() / span)


def _variable(res: TwoPoint, variable: str, rows: np.ndarray) -> np.ndarray:
    """The x variable [len(rows), R] of each curve: |x−y|²/ᾱ_t or |x−y|."""
    _check_choice("variable", variable, VARIABLES)
    r = np.broadcast_to(res.separation[None, :], (len(rows), len(res.separation)))
    if variable == "r":
        return r
    with np.errstate(divide="ignore"):
        return r**2 / res.alpha_bar[rows, None]


def _select_rows(res: TwoPoint, times: Sequence[float] | None,
                 alpha_bar_range: tuple[float, float] | None) -> np.ndarray:
    """Indices of the chosen curves: nearest recorded t to each of `times` (None: every time with
    ᾱ > ALPHA_BAR_FLOOR), then those with ᾱ inside alpha_bar_range (inclusive) if given."""
    if times is None:
        rows = np.flatnonzero(res.alpha_bar > ALPHA_BAR_FLOOR)
    else:
        req = np.atleast_1d(np.asarray(times, dtype=np.float64))
        if req.size == 0:
            raise InformationError("times is empty: give the recorded times t to compare (or None)")
        lo, hi = res.t.min(), res.t.max()
        tol = 1e-9 * max(hi - lo, 1e-300)
        bad = ~np.isfinite(req) | (req < lo - tol) | (req > hi + tol)
        if bad.any():
            raise InformationError(f"times {req[bad].tolist()} lie outside the recorded times [{lo:.6g}, {hi:.6g}]")
        rows = np.unique([int(np.abs(res.t - v).argmin()) for v in req])
    if alpha_bar_range is not None:
        a_lo, a_hi = alpha_bar_range
        rows = rows[(res.alpha_bar[rows] >= a_lo) & (res.alpha_bar[rows] <= a_hi)]
    return rows


def collapse(res: TwoPoint, variable: str = "r2_over_alpha_bar", quantity: str = "rho",
             times: Sequence[float] | None = None, alpha_bar_range: tuple[float, float] | None = None,
             points: int = 32) -> float:
    """Collapse number of the curves ρ_t (or I_t) against `variable` (smaller = better; see `collapse_score`).

    variable: 'r2_over_alpha_bar' — the self-similar variable |x−y|²/ᾱ_t of the diffusive regime (eq. 10) —
    or 'r' — the separation |x−y| itself. The diffusive regime predicts a small number for the first and a
    larger one for the second. times: recorded t values (nearest recorded time); default every time with
    ᾱ > ALPHA_BAR_FLOOR (the pure-noise state carries no curve). alpha_bar_range: keep only times with ᾱ inside.
    """
    _check_choice("quantity", quantity, QUANTITIES)
    rows = _select_rows(res, times, alpha_bar_range)
    x = _variable(res, variable, rows)
    y = res.curves(quantity)[rows]
    return collapse_score(list(x), list(y), points)


@dataclass
class CollapseProfile:
    """Collapse numbers over sliding windows of `window` consecutive times (sorted by ᾱ): score [W] (NaN where the
    window's curves share no range), and each window's ᾱ and t span alpha_bar_lo/hi, t_lo/hi [W]."""

    score: np.ndarray
    alpha_bar_lo: np.ndarray
    alpha_bar_hi: np.ndarray
    t_lo: np.ndarray
    t_hi: np.ndarray
    variable: str
    quantity: str
    window: int

    def holds_until(self, threshold: float) -> float:
        """The largest ᾱ up to which every window, from the earliest on, collapses (score < threshold): the
        diffusive regime "holds for ᾱ < X". NaN when the earliest window already fails."""
        reached = math.nan
        for score, hi in zip(self.score, self.alpha_bar_hi, strict=True):
            if not score < threshold:
                break
            reached = float(hi)
        return reached


def collapse_by_time(res: TwoPoint, variable: str = "r2_over_alpha_bar", window: int = 3, quantity: str = "rho",
                     times: Sequence[float] | None = None, points: int = 32) -> CollapseProfile:
    """`collapse` over every run of `window` consecutive times (default times as in `collapse`), in order of
    increasing ᾱ: where along the process the curves collapse, e.g. `.holds_until(0.05)`."""
    window = _check_positive("window", window)
    if window < 2:
        raise InformationError("window must be at least 2 (a collapse compares curves)")
    _check_choice("quantity", quantity, QUANTITIES)
    rows = _select_rows(res, times, None)
    rows = rows[np.argsort(res.alpha_bar[rows], kind="stable")]
    if len(rows) < window:
        raise InformationError(f"window {window} exceeds the {len(rows)} usable times")
    x_all, y_all = _variable(res, variable, rows), res.curves(quantity)[rows]
    scores = []
    for s in range(len(rows) - window + 1):
        try:
            scores.append(collapse_score(list(x_all[s:s + window]), list(y_all[s:s + window]), points))
        except InformationError:
            scores.append(math.nan)
    starts, ends = rows[:len(rows) - window + 1], rows[window - 1:]
    return CollapseProfile(np.asarray(scores), res.alpha_bar[starts], res.alpha_bar[ends], res.t[starts],
                           res.t[ends], variable, quantity, window)


# ---- the snapping regime (eq. 8) ---------------------------------------------------------------------------------

@dataclass
class States:
    """Full states of a (small) ensemble at S chosen steps: x [S, N, C, H, W] float64, t, alpha_bar, steps [S]."""

    x: Tensor
    t: np.ndarray
    alpha_bar: np.ndarray
    steps: np.ndarray


def record_states(model: Any, noise: Tensor, times: Sequence[float] | None = None, steps: int = 20,
                  schedule: Any = "cosine", sampler: str = "ddim", labels: Any = None, batch_size: int = 64,
                  progress: bool = False, seeds: Sequence[int] | None = None, grid: str | None = None,
                  ts: Any = None, **sample_options: Any) -> States:
    """The states x at the chosen steps (as in `record`), kept whole: O(S·N·C·H·W) memory, for late-time
    snapping checks and tests, not for large ensembles."""
    noise = _check_noise(model, noise)
    batch_size = _check_positive("batch_size", batch_size)
    sched, grid_t = _sampler_grid(_check_positive("steps", steps), schedule, sampler, grid, ts)
    chosen = select_steps(grid_t, times)
    out = torch.zeros(len(chosen), *noise.shape, dtype=torch.float64)

    def keep(slot: int, x: Tensor, index: Tensor) -> None:
        out[slot, index] = x.detach().to("cpu", torch.float64)

    alpha_bars = _run_batches(model, noise, chosen, grid_t, sched, sampler, labels, seeds, batch_size, progress,
                              keep, sample_options)
    return States(out, grid_t[chosen].numpy(), np.asarray(alpha_bars), np.asarray(chosen, dtype=np.int64))


def nearest_patch_centres(model: Any, x: Tensor, alpha_bar: float, data: Any, labels: Any = None) -> Tensor:
    """φ*(0) of eq. 7–8: for states x [B, C, H, W] at ᾱ, the centre value (all channels) of each pixel's arg-max
    bank patch under a patch machine with provenance (ELS, LS, bbELS: the patch of training image n centred at
    (y, x); IS / ES: the nearest whole training image, circularly shifted). Returns [B, C, H, W] float64."""
    if not hasattr(model, "denoise_with_provenance"):
        raise InformationError("nearest_patch_centres needs a machine with provenance (is, es, ls, els, bbels), "
                               f"got {type(model).__name__}")
    x = torch.as_tensor(x)
    ab = torch.full((x.shape[0],), float(alpha_bar), dtype=torch.float32)
    _, prov = model.denoise_with_provenance(x.to(torch.float32), ab, labels)
    images = data.images.detach().to("cpu", torch.float64)                   # [N, C, H, W]
    prov = prov.cpu()
    if prov.ndim == 2:                                                       # IS / ES: [B, 3] image, shift
        return torch.stack([torch.roll(images[int(n)], (int(sy), int(sx)), dims=(-2, -1)) for n, sy, sx in prov])
    return images[prov[..., 0], :, prov[..., 1], prov[..., 2]].permute(0, 3, 1, 2).contiguous()   # [B, C, H, W]


@dataclass
class Snapping:
    """Late-time states against a closed-form relaxation to φ*(0), per pixel.

    predicted, deviation [S, B, C, H, W]: the closed form from the first (reference) state and x − predicted;
    alpha_bar [S]; rms_deviation [S] and rms_distance [S] (RMS of x − φ* over every pixel: the scale the
    deviation should be judged against); form: which closed form."""

    predicted: Tensor
    deviation: Tensor
    alpha_bar: np.ndarray
    rms_deviation: np.ndarray
    rms_distance: np.ndarray
    form: str


def snap_prediction(x_ref: Tensor, target: Tensor, alpha_bar_ref: float, alpha_bar: Sequence[float],
                    form: str = "probability_flow") -> Tensor:
    """Closed-form relaxation of the reference state x_ref [B, C, H, W] (at ᾱ_ref) towards φ* = target
    [B, C, H, W] at each later ᾱ_s; ε = 1 − ᾱ. Returns [S, B, C, H, W].

    'eq8'  the paper's eq. 8 as printed, ∂φ/∂t = −(∂_t ε/ε)(φ − φ*): (φ − φ*)·ε is constant, so
           φ_s = φ* + (φ_ref − φ*)·ε_ref/ε_s — the distance to φ* grows like 1/ε (whichever way t runs).
    'eq1'  the leading order of eq. 1 with a snapped score (x̂₀ = φ*): ∂φ/∂t = (∂_t ᾱ/ᾱ)(−(ᾱφ − √ᾱφ*)/ε)
           ≈ (∂_t ε/ε)(φ − φ*), so φ_s = φ* + (φ_ref − φ*)·ε_s/ε_ref (eq. 8 with the opposite sign).
    'probability_flow'  the probability-flow ODE (Song et al., with its factor ½, which eq. 1 lacks; exactly
           what DDIM integrates) with x̂₀ ≡ φ*: φ − √ᾱ φ* ∝ √ε, φ_s = √ᾱ_s φ* + √(ε_s/ε_ref)(φ_ref − √ᾱ_ref φ*);
           to leading order ∂φ/∂t ≈ (∂_t ε/2ε)(φ − φ*)."""
    _check_choice("form", form, SNAP_FORMS)
    ab = torch.as_tensor(np.asarray(alpha_bar, dtype=np.float64))[:, None, None, None, None]   # [S, 1, 1, 1, 1]
    eps, eps_ref = 1 - ab, 1 - float(alpha_bar_ref)
    x_ref, target = x_ref.to(torch.float64)[None], target.to(torch.float64)[None]
    if form == "eq8":
        return target + (x_ref - target) * eps_ref / eps
    if form == "eq1":
        return target + (x_ref - target) * eps / eps_ref
    return ab.sqrt() * target + (eps / eps_ref).sqrt() * (x_ref - math.sqrt(alpha_bar_ref) * target)


def snapping(states: States | Tensor, target: Tensor, alpha_bar: Sequence[float] | None = None,
             form: str = "probability_flow") -> Snapping:
    """Compare late-time states with the closed-form relaxation to the nearest bank patch (eq. 8).

    states: a `States` (from `record_states` at a few late times) or x [S, B, C, H, W] with alpha_bar [S];
    the ᾱ must increase (process order) and the first state, ᾱ < 1, is the reference the prediction starts from.
    target: φ*(0) [B, C, H, W], e.g. `nearest_patch_centres(model, states.x[0], states.alpha_bar[0], data)`.
    form: 'probability_flow' (default: the relaxation DDIM integrates once x̂₀ has snapped), 'eq1', or 'eq8' (the
    equation as printed, whose solution moves away from φ* like 1/ε — kept for comparison) — see
    `snap_prediction`.
    Returns per-pixel deviations x − predicted."""
    if isinstance(states, States):
        x, ab = states.x, np.asarray(states.alpha_bar if alpha_bar is None else alpha_bar, dtype=np.float64)
    else:
        if alpha_bar is None:
            raise InformationError("alpha_bar [S] is required when states is a tensor")
        x, ab = torch.as_tensor(states), np.asarray(alpha_bar, dtype=np.float64)
    x = x.to(torch.float64)
    target = torch.as_tensor(target).to(torch.float64)
    if x.ndim != 5 or x.shape[0] < 2:
        raise InformationError(f"states must be [S, B, C, H, W] with S ≥ 2, got {tuple(x.shape)}")
    if tuple(target.shape) != tuple(x.shape[1:]):
        raise InformationError(f"target must be [B, C, H, W] = {tuple(x.shape[1:])}, got {tuple(target.shape)}")
    if ab.shape != (x.shape[0],) or not np.all(np.diff(ab) > 0) or not (0 < ab[0] < 1):
        raise InformationError(f"alpha_bar must give one strictly increasing ᾱ per state, the first in (0, 1); "
                               f"got {ab.tolist()}")
    if form == "eq8" and ab[-1] >= 1:
        raise InformationError("eq. 8 is singular at ᾱ = 1 (ε = 0): leave the final state out")
    predicted = snap_prediction(x[0], target, float(ab[0]), ab, form)
    deviation = x - predicted
    rms = deviation.pow(2).flatten(1).mean(1).sqrt().numpy()
    distance = (x - target[None]).pow(2).flatten(1).mean(1).sqrt().numpy()
    return Snapping(predicted, deviation, ab, rms, distance, form)


# ---- the figure ---------------------------------------------------------------------------------------------------

def information_figure(res: TwoPoint, quantity: str = "mi", times: Sequence[float] | None = None,
                       alpha_bar_range: tuple[float, float] | None = None, log_colour: bool = False) -> Any:
    """The paper's Fig. 2/3: I (or ρ) against |x−y| (left) and against |x−y|²/ᾱ_t (right, log axis), one curve
    per time (default times as in `collapse`) coloured by ᾱ_t (log_colour: on a log scale), bootstrap standard
    errors as bands; the title gives both collapse numbers (`collapse`). The axes end where every curve has
    fallen below 1% of the largest value (at least 5 pixels), so the structure is not squeezed."""
    from matplotlib import colors
    from matplotlib.cm import ScalarMappable

    from .figures import _pyplot

    plt = _pyplot()
    _check_choice("quantity", quantity, QUANTITIES)
    rows = _select_rows(res, times, alpha_bar_range)
    if len(rows) == 0:
        raise InformationError("no time left to plot (times / alpha_bar_range select none with ᾱ > 0)")
    ab = res.alpha_bar[rows]
    lo, hi = float(ab.min()), float(max(ab.max(), ab.min() * (1 + 1e-9)))
    norm = colors.LogNorm(lo, hi) if log_colour else colors.Normalize(lo, hi)
    cmap = plt.get_cmap("viridis")
    y, err = res.curves(quantity)[rows], (res.rho_err if quantity == "rho" else res.mi_err)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    for j, i in enumerate(rows):
        colour = cmap(norm(ab[j]))
        for ax, xv in zip(axes, (res.separation, res.separation**2 / res.alpha_bar[i]), strict=True):
            ax.plot(xv, y[j], "o-", ms=2.5, lw=1, color=colour)
            if err is not None and np.isfinite(err[i]).any():
                ax.fill_between(xv, y[j] - err[i], y[j] + err[i], color=colour, alpha=0.2, lw=0)
    x_scaled = res.separation[None, :] ** 2 / ab[:, None]                     # [T', R]
    r_visible = _visible_extent(np.broadcast_to(res.separation, y.shape), y)
    axes[0].set_xlim(0, min(1.02 * res.separation.max(), max(5.0, 1.3 * r_visible)))
    axes[1].set_xlim(0.7 * x_scaled.min(), min(1.5 * x_scaled.max(), 3 * _visible_extent(x_scaled, y)))
    label = ("Gaussian mutual information I (nats, eq. 5)" if quantity == "mi"
             else "correlation coefficient ρ (eq. 6)")
    axes[0].set_xlabel("separation |x−y| (pixels)")
    axes[1].set_xlabel("self-similar variable |x−y|²/ᾱ_t (pixels²)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("against separation", fontsize=10)
    axes[1].set_title("against |x−y|²/ᾱ_t: one curve in the diffusive regime (eq. 10)", fontsize=10)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="ᾱ_t of the curve (0 = noise, 1 = data)")
    how = "translation average" if res.method == "translation" else f"{len(res.anchors)} anchor pixel(s)"
    fig.suptitle(f"{_collapse_text(res, quantity, rows)}\n{how}, N = {res.n} samples, {len(rows)} times "
                 f"(ᾱ {lo:.3g} to {ab.max():.3g}), bands: ±1 bootstrap s.e.", fontsize=10)
    return fig


def _visible_extent(x: np.ndarray, y: np.ndarray) -> float:
    """Largest x [T', R] at which some curve y [T', R] still exceeds 1% of the largest |y| (all x if none)."""
    top = np.nanmax(np.abs(y)) if np.isfinite(y).any() else 0.0
    above = np.abs(np.nan_to_num(y)) > 0.01 * top
    return float(x[above].max()) if top > 0 and above.any() else float(np.nanmax(x))


def _collapse_text(res: TwoPoint, quantity: str, rows: np.ndarray) -> str:
    numbers = []
    for variable, name in (("r", "|x−y|"), ("r2_over_alpha_bar", "|x−y|²/ᾱ")):
        try:
            value = f"{collapse(res, variable, quantity, times=res.t[rows]):.3f}"
        except InformationError:
            value = "n/a (no shared range)"
        numbers.append(f"against {name}: {value}")
    return "collapse number (mean spread / range of the mean curve; 0 = one curve) " + ", ".join(numbers)


# the EFT coefficients (eft.py) belong to the same public API: sf.analysis.information.eft_coefficients
from .eft import eft_coefficients  # noqa: E402

__all__ = [
    "ALPHA_BAR_FLOOR", "CollapseProfile", "InformationError", "RHO2_MAX", "Snapping", "States", "Trajectory",
    "TwoPoint", "collapse", "collapse_by_time", "collapse_score", "default_anchors", "gaussian_information",
    "information_figure", "moments_from_samples", "nearest_patch_centres", "periodic_d2", "radial_average",
    "eft_coefficients", "record", "record_states", "select_steps", "snap_prediction", "snapping", "two_point",
]
