"""The ideal denoiser on the nearest training images: exact top-k with a certified bound, and the nearest
training image itself (the memorization baselines of the comparison tables).

Exact top-k. The ideal (IS) posterior (kamb-ganguli eq. 3–4) restricted to the k training images nearest to
the noisy input in ‖x − √ᾱ·y_j‖, found by an exact search (float64 distances streamed over chunks of images;
the analytic-diffusion-studio's `optimal` model uses a FAISS index with no bound on what it leaves out).
Every excluded image j has logit ℓ_j = −d_j / (2(1−ᾱ)T) ≤ ℓ_max,out, the logit of the nearest excluded distance
less a bound on its float64 rounding error, so the excluded mass R ≤ (N − k)·exp(ℓ_max,out), and Z_k is taken
from the kept distances plus that bound (from below); the neglected fraction of the posterior mass is at most
    ε = R / (Z_k + R) ≤ 1 / (1 + Z_k / ((N − k)·exp(ℓ_max,out))),   Z_k = Σ_{j ∈ top-k} exp(ℓ_j).
Since x̂₀ = (1 − ε)·x̂₀(top-k) + ε·x̂₀(rest), every pixel of the top-k result lies within ε·(max − min of the
training pixels at that coordinate) ≤ 2ε of the IS result (images in [−1, 1]). The bound of each sample of the
last call is `model.last_neglected_bound` [B] (also `neglected_bound()`, and 'neglected_bound' in the engine
log). With `tol`, k doubles per sample until ε ≤ tol (at most N), so the result equals IS to 2·tol per pixel.
k ≥ N is the IS machine exactly (the same engine call). The weighted mean over the k images is folded by the
engine (`softmax_posterior` over a bank of one group per sample).

Nearest training image: argmin_j ‖x − √ᾱ·y_j‖ (metric='posterior', the zero-temperature limit of IS), or
argmin_j ‖x − y_j‖ on the unscaled input (metric='studio', the analytic-diffusion-studio's `nearest_dataset`).
"""
from __future__ import annotations

import math

import torch

from ...data import ImageSet
from ...engine import DEFAULT_MEMORY_BUDGET, DEFAULT_TOPK, noise_coefficients, softmax_posterior
from ...engine.banks import CachedBank
from ..base import Denoiser
from ..machines import resolve_dtype
from ..registry import ModelConfigError, register_model
from ._common import TheoryMachine, check_temperature, image_mean

Tensor = torch.Tensor

SEARCH_CHUNK_BYTES = 2**27           # float64 bytes of training images converted at once by the search
UNIT_ROUNDOFF = 2.0**-53


def exact_search(x: Tensor, a: Tensor, images: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The k training images nearest to each query in d_j = ‖x − a·y_j‖², exactly.

    x [B, D], a [B] (float64), images [N, D]. Returns (index [B, k] nearest first, d [B, k] their distances in
    float64 difference form, d_out [B]: a certified lower bound on the distance of every image not returned,
    +∞ when k ≥ N, margin [B]: a bound on the rounding error of any computed distance). Both float64 forms
    (the search's expansion ‖x‖² − 2a·x·y + a²‖y‖² and the difference form) err by at most
    γ·(‖x‖ + a·max‖y‖)², γ = (D + 4)·u/(1 − (D + 4)·u) (a sum of D + 4 rounded terms, each at most that), which
    d_out subtracts."""
    b, d = x.shape
    n = images.shape[0]
    keep = min(k + 1, n)
    xd = x.to(torch.float64)
    x2 = (xd * xd).sum(1)                                                         # [B]
    best_d = torch.full((b, 0), math.inf, dtype=torch.float64, device=x.device)
    best_i = torch.zeros((b, 0), dtype=torch.int64, device=x.device)
    y_max = 0.0
    step = max(1, SEARCH_CHUNK_BYTES // (8 * d))
    for start in range(0, n, step):
        y = images[start:start + step].to(device=x.device, dtype=torch.float64)  # [n', D]
        y2 = (y * y).sum(1)
        y_max = max(y_max, float(y2.max().sqrt()))
        dist = x2[:, None] - 2 * a[:, None] * (xd @ y.T) + (a * a)[:, None] * y2[None, :]
        cand_d = torch.cat([best_d, dist], 1)
        cand_i = torch.cat([best_i, torch.arange(start, start + y.shape[0], device=x.device).expand(b, -1)], 1)
        top = torch.topk(cand_d, min(keep, cand_d.shape[1]), dim=1, largest=False)
        best_d, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    index = best_i[:, :k]
    chosen = images[index.reshape(-1)].to(device=x.device, dtype=torch.float64).reshape(b, -1, d)
    exact = ((xd[:, None, :] - a[:, None, None] * chosen) ** 2).sum(-1)           # [B, k] difference form
    order = torch.argsort(exact, dim=1, stable=True)
    exact, index = torch.gather(exact, 1, order), torch.gather(index, 1, order)
    terms = d + 4
    gamma = terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)
    margin = gamma * (x2.sqrt() + a * y_max) ** 2
    if k >= n:
        return index, exact, torch.full((b,), math.inf, dtype=torch.float64, device=x.device), margin
    return index, exact, (best_d[:, k] - margin).clamp_min(0), margin


def neglected_fraction(d_kept: Tensor, d_out: Tensor, n_out: int, s2t: Tensor) -> Tensor:
    """The bound ε [B] on the posterior mass outside the kept images (module docstring): d_kept [B, k] upper
    bounds on the kept distances (Z_k is bounded from below), d_out [B] a lower bound on the excluded distances,
    n_out excluded images, s2t [B] = (1−ᾱ)·T."""
    if n_out == 0:
        return torch.zeros(d_kept.shape[0], dtype=torch.float64, device=d_kept.device)
    log_z = torch.logsumexp(-d_kept / (2 * s2t[:, None]), dim=1)
    log_r = math.log(n_out) - d_out / (2 * s2t)
    return torch.sigmoid(log_r - log_z)


class TopK(TheoryMachine):
    """The ideal denoiser restricted to each sample's k nearest training images (module docstring)."""

    def __init__(self, data: ImageSet, k: int, tol: float | None, temperature: float, conditional: bool,
                 dtype: torch.dtype, memory_budget: float, topk: int) -> None:
        super().__init__(data, "topk", conditional, lambda images: images,
                         {"k": k, "tol": tol, "temperature": temperature, "dtype": str(dtype).replace("torch.", "")})
        self.k, self.tol, self.temperature, self.dtype = k, tol, temperature, dtype
        self.memory_budget, self.topk = float(memory_budget), int(topk)
        self.last_neglected_bound: Tensor | None = None       # [B] ε of the last call, batch order
        self.last_k: Tensor | None = None                     # [B] images kept per sample in the last call

    def neglected_bound(self) -> Tensor | None:
        """ε [B] of the last call: the neglected fraction of each sample's posterior mass is at most this."""
        return self.last_neglected_bound

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        self.last_neglected_bound = torch.zeros(x.shape[0], dtype=torch.float64)
        self.last_k = torch.zeros(x.shape[0], dtype=torch.int64)
        return super().denoise(x, alpha_bar, labels)

    def _part(self, images: Tensor, x: Tensor, alpha_bar: Tensor, label: int | None) -> Tensor:
        rows = self._current_rows.cpu()
        n, b = images.shape[0], x.shape[0]
        if self.k >= n:                                   # the ideal denoiser itself
            self.last_k[rows] = n
            self._log.append({"label": label, "cross_term": "image", "device": str(x.device), "k": n,
                              "alpha_bar": alpha_bar.tolist(), "neglected_bound": 0.0})
            return image_mean(x, alpha_bar, images, temperature=self.temperature, dtype=self.dtype,
                              topk=self.topk, memory_budget=self.memory_budget)
        a, s2 = noise_coefficients(alpha_bar.to(x.device))
        flat_x = x.detach().reshape(b, -1).to(torch.float64)
        flat_y = images.reshape(n, -1)
        k = torch.full((b,), self.k, dtype=torch.int64)
        bound = torch.ones(b, dtype=torch.float64)
        out = torch.empty(b, flat_y.shape[1], dtype=torch.float64, device=x.device)
        todo = torch.arange(b)
        while todo.numel():
            size = int(k[todo[0]])
            group = todo[k[todo] == size]
            dev = group.to(x.device)
            if size >= n:
                out[dev] = image_mean(x[dev], alpha_bar[dev], images, temperature=self.temperature,
                                      dtype=self.dtype, topk=self.topk,
                                      memory_budget=self.memory_budget).reshape(len(group), -1).double()
                bound[group] = 0.0
                todo = todo[~torch.isin(todo, group)]
                continue
            index, dist, d_out, margin = exact_search(flat_x[dev], a[dev], flat_y, size)
            eps = neglected_fraction(dist + margin[:, None], d_out, n - size, s2[dev] * self.temperature).cpu()
            done = torch.ones(len(group), dtype=torch.bool) if self.tol is None else eps <= self.tol
            if done.any():
                keep = done.to(x.device)
                out[dev[keep]] = self._fold(flat_x[dev[keep]], a[dev[keep]], s2[dev[keep]], flat_y,
                                            index[keep], x.dtype)
                bound[group[done]] = eps[done]
            k[group[~done]] = min(2 * size, n)
            todo = todo[~torch.isin(todo, group[done])]
        self.last_neglected_bound[rows] = bound
        self.last_k[rows] = k
        self._log.append({"label": label, "cross_term": "topk", "device": str(x.device), "k": int(k.max()),
                          "alpha_bar": alpha_bar.tolist(), "neglected_bound": float(bound.max())})
        return out.reshape(x.shape).to(x.dtype)

    def _fold(self, q: Tensor, a: Tensor, s2: Tensor, flat_y: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
        """Σ_j softmax_j x_j over each sample's own images index [B', k]: the engine, one group per sample."""
        b, k = index.shape
        per = max(1, int(self.memory_budget // (16 * max(1, k * flat_y.shape[1] * 4))))
        parts = []
        for start in range(0, b, per):
            sl = slice(start, start + per)
            keys = flat_y[index[sl].reshape(-1).to(flat_y.device)].to(q.device, torch.float32)
            keys = keys.reshape(-1, k, flat_y.shape[1])                                 # [b', k, D]
            sources = torch.stack([index[sl], torch.zeros_like(index[sl]), torch.zeros_like(index[sl])], -1)
            bank = CachedBank(keys, torch.zeros(keys.shape[:2], dtype=torch.float32, device=q.device), keys,
                              sources.to(q.device))
            mean, _ = softmax_posterior(q[sl, None, :].to(self.dtype), a[sl, None],
                                        (s2[sl] * self.temperature)[:, None], bank, dtype=self.dtype,
                                        topk=self.topk, memory_budget=self.memory_budget)
            parts.append(mean[:, 0].double())
        return torch.cat(parts)


class Nearest(TheoryMachine):
    """The training image nearest to the noisy input (module docstring)."""

    def __init__(self, data: ImageSet, metric: str, conditional: bool) -> None:
        super().__init__(data, "nearest", conditional, lambda images: images, {"metric": metric})
        self.metric = metric
        self.last_index: Tensor | None = None                 # [B] dataset-local index (within the class)

    def _part(self, images: Tensor, x: Tensor, alpha_bar: Tensor, label: int | None) -> Tensor:
        b, n = x.shape[0], images.shape[0]
        a = (noise_coefficients(alpha_bar.to(x.device))[0] if self.metric == "posterior"
             else torch.ones(b, dtype=torch.float64, device=x.device))
        index, _, _, _ = exact_search(x.detach().reshape(b, -1), a, images.reshape(n, -1), 1)
        self._log.append({"label": label, "cross_term": "nearest", "device": str(x.device),
                          "alpha_bar": alpha_bar.tolist()})
        return images[index[:, 0].to(images.device)].to(device=x.device, dtype=x.dtype)


@register_model("topk")
def build_topk(data: ImageSet, k: int = 200, tol: float | None = None, temperature: float = 1.0,
               conditional: bool = False, dtype: torch.dtype | str = torch.float32,
               memory_budget: float = DEFAULT_MEMORY_BUDGET, topk: int = DEFAULT_TOPK) -> Denoiser:
    """Exact top-k ideal denoiser: the IS posterior over each sample's k nearest training images (exact search,
    default k = 200 as the studio's configs), with the neglected posterior mass bounded per sample
    (`last_neglected_bound`); tol: double k until the bound is at most tol; k ≥ N is IS exactly."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ModelConfigError(f"topk: k must be a positive integer, got {k!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise ModelConfigError(f"topk: tol must be a number in [0, 1) or None, got {tol!r}")
    return TopK(data, k, None if tol is None else float(tol), check_temperature(temperature), conditional,
                resolve_dtype(dtype), memory_budget, topk)


@register_model("nearest")
def build_nearest(data: ImageSet, metric: str = "posterior", conditional: bool = False) -> Denoiser:
    """The nearest training image: argmin ‖x − √ᾱ·y‖ (metric 'posterior') or ‖x − y‖ ('studio')."""
    if metric not in ("posterior", "studio"):
        raise ModelConfigError(f"nearest: metric must be 'posterior' or 'studio', got {metric!r}")
    return Nearest(data, metric, conditional)

