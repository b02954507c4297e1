"""PCA-locality (Lukoianov et al. 2025, "Locality in image diffusion models emerges from data statistics",
arXiv 2509.09672): the posterior over whole training images in which each output pixel measures distances only
inside its own locality mask, the mask read off the data's Wiener filter.

At ᾱ (a = √ᾱ, s² = 1−ᾱ, σ² = s²/a²) the Wiener filter of the training set's covariance Σ = U diag(λ) Uᵀ is
    W = Σ (Σ + σ² I)⁻¹ = U diag(ᾱλ / (ᾱλ + 1 − ᾱ)) Uᵀ                             [D × D, D = C·H·W]
Each row n is divided by its diagonal entry W_nn (entries below 1e-6 count as 1), M = W / diag(W)[:, None],
and binarized at τ times the largest |M| of the whole matrix: B = |M| ≥ τ·max|M| (τ = 0.02; the authors use
0.05 for CIFAR-10). Output coordinate m then has logits over training images y_j
    ℓ_j(m) = −Σ_n mask_m(n) (x_n − a·y_j,n)² / (2 s² T)         (T: the temperature option, default 1)
and x̂₀_m = Σ_j softmax_j(ℓ_j(m)) y_j,m.

Which entries form pixel m's mask (`convention`): 'studio' (default) is what the authors' released code
(analytic-diffusion-studio, `pca_locality.py`) computes — `einsum("bkn,nm->bkm", Δ², B)`, i.e. column m of the
row-normalized, binarized filter: mask_m(n) = B[n, m]; 'row' reads row m instead (mask_m(n) = B[m, n], pixel
m's own filter row normalized by its own diagonal). W is symmetric, so the two differ only by which diagonal
normalizes an entry. τ must be positive: the masks are binary (τ = 0 would weight distances by the raw,
possibly negative, normalized filter).

Implementation (`PCALocality._fold`): per chunk of training images, the squared differences (x − a·y_j)² in
difference form (as the released code: no float32 cancellation), their sums over each mask — 'dense': one GEMM
with the D×D mask, as the released code's einsum; 'sparse': `embedding_bag` sums over each mask's entries,
B·N·Σ_m |mask_m| additions instead of B·N·D² multiply-adds, chosen when under 10% of the mask is set — and the
engine's streaming log-sum-exp over all training images (`kernels.accumulate`, the compiled fold on the CPU).
The softmax is normalized over the whole training set (the released code's `WeightedStreamingSoftmax`
normalizes within each data-loader batch and averages the batches' means, which is the posterior only when one
batch holds the whole training set). The masks of a noise level are built once (one D×D product) and kept for
the last 32 noise levels.

On MNIST the global max of |M| comes from nearly constant border pixels (tiny W_nn), so at low noise most
masks are empty (those pixels then get the training mean): that is the released code's definition, kept as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...data import ImageSet
from ...engine import DEFAULT_MEMORY_BUDGET, MIN_NOISE_VARIANCE, kernels, noise_coefficients
from ...engine.gemm_route import fold_path
from ..base import Denoiser
from ..machines import resolve_dtype
from ..registry import ModelConfigError, register_model
from ._common import TheoryMachine, check_temperature

Tensor = torch.Tensor

DIAGONAL_EPS = 1e-6          # the released code's floor: a smaller diagonal entry normalizes by 1
CACHED_LEVELS = 32           # noise levels whose masks are kept
CONVENTIONS = ("studio", "row")
ROUTES = ("auto", "sparse", "dense")
SPARSE_DENSITY = 0.1         # below this fraction of mask entries the sparse sums beat the GEMM (measured)


def wiener_filter(eigenvalues: Tensor, eigenvectors: Tensor, alpha_bar: float) -> Tensor:
    """W = U diag(ᾱλ / (ᾱλ + 1 − ᾱ)) Uᵀ [D, D] (float64), 1 − ᾱ floored like the engine's s²."""
    lam = eigenvalues
    gain = alpha_bar * lam / (alpha_bar * lam + max(1.0 - alpha_bar, MIN_NOISE_VARIANCE))
    return (eigenvectors * gain) @ eigenvectors.T


def locality_masks(eigenvalues: Tensor, eigenvectors: Tensor, alpha_bar: float, tau: float,
                   convention: str = "studio") -> Tensor:
    """Boolean [D, D]: row m is output coordinate m's mask (see the module docstring)."""
    w = wiener_filter(eigenvalues, eigenvectors, alpha_bar)
    diag = torch.diagonal(w).clone()
    diag[diag.abs() < DIAGONAL_EPS] = 1.0
    m = (w / diag[:, None]).abs()
    top = float(m.max())
    if top == 0.0:           # W = 0: every logit is the same whatever the mask; empty masks say so for free
        return torch.zeros_like(m, dtype=torch.bool)
    binary = m >= tau * top
    return binary.T.contiguous() if convention == "studio" else binary


class LocalityBank:
    """One training set's images, the eigendecomposition of their covariance, and the mask buckets per ᾱ."""

    def __init__(self, images: Tensor, tau: float, convention: str) -> None:
        self.images = images.detach().to(torch.float32).contiguous()             # [N, C, H, W]
        n = self.images.shape[0]
        flat = self.images.reshape(n, -1).to(torch.float64)
        cov = torch.cov(flat.T, correction=1).reshape(flat.shape[1], flat.shape[1]) if n > 1 else \
            torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        lam, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        self.eigenvalues, self.eigenvectors = lam.clamp_min(0), vecs
        self.tau, self.convention = tau, convention
        self._bags: dict[float, tuple[Tensor, Tensor]] = {}
        self._masks: dict[float, Tensor] = {}

    def to(self, device: torch.device) -> LocalityBank:
        device = torch.device(device)
        if device != self.images.device:
            self.images = self.images.to(device)
            self.eigenvalues, self.eigenvectors = self.eigenvalues.to(device), self.eigenvectors.to(device)
            self._bags, self._masks = {}, {}
        return self

    def masks(self, alpha_bar: float) -> Tensor:
        """Boolean [D, D] (row m: output coordinate m's mask), kept for the last CACHED_LEVELS noise levels."""
        key = float(alpha_bar)
        if key not in self._masks:
            self._masks[key] = locality_masks(self.eigenvalues, self.eigenvectors, key, self.tau, self.convention)
            while len(self._masks) > CACHED_LEVELS:
                del self._masks[next(iter(self._masks))]
        return self._masks[key]

    def bag(self, alpha_bar: float) -> tuple[Tensor, Tensor]:
        """(columns [nnz], offsets [D]) of the masks at ᾱ in CSR order: coordinate m's mask is
        columns[offsets[m]:offsets[m+1]] (the sparse route's `embedding_bag` input)."""
        key = float(alpha_bar)
        if key not in self._bags:
            mask = self.masks(key)
            counts = mask.sum(1)
            offsets = torch.zeros_like(counts)
            offsets[1:] = counts.cumsum(0)[:-1]
            self._bags[key] = (torch.nonzero(mask)[:, 1].contiguous(), offsets)
            while len(self._bags) > CACHED_LEVELS:
                del self._bags[next(iter(self._bags))]
        return self._bags[key]


class PCALocality(TheoryMachine):
    """The PCA-locality denoiser (see the module docstring)."""

    def __init__(self, data: ImageSet, tau: float, temperature: float, convention: str, conditional: bool,
                 dtype: torch.dtype, memory_budget: float, route: str = "auto") -> None:
        super().__init__(data, "pca-locality", conditional, lambda images: LocalityBank(images, tau, convention),
                         {"tau": tau, "temperature": temperature, "convention": convention, "route": route,
                          "dtype": str(dtype).replace("torch.", "")})
        self.temperature, self.dtype = temperature, dtype
        self.memory_budget, self.route = float(memory_budget), route

    def masks(self, alpha_bar: float, label: int | None = None) -> Tensor:
        """Boolean [D, D] masks at ᾱ (row m: the coordinates output coordinate m measures distances over)."""
        return self.bank(label).masks(float(alpha_bar))

    def route_for(self, bank: LocalityBank, alpha_bar: float) -> str:
        """'sparse' or 'dense' at ᾱ: the `route` option, or by the masks' density when 'auto' (summing the
        masked entries costs about 1/SPARSE_DENSITY of a multiply-add of the GEMM per entry, measured)."""
        if self.route != "auto":
            return self.route
        return "sparse" if float(bank.masks(alpha_bar).float().mean()) < SPARSE_DENSITY else "dense"

    def _part(self, bank: LocalityBank, x: Tensor, alpha_bar: Tensor, label: int | None) -> Tensor:
        b = x.shape[0]
        out = torch.empty(b, math.prod(self.image_shape), dtype=torch.float64, device=x.device)
        values = alpha_bar.tolist()
        for value in dict.fromkeys(values):
            rows = torch.tensor([i for i, v in enumerate(values) if v == value], device=x.device)
            route = self.route_for(bank, value)
            out[rows] = self._fold(bank, x[rows], value, route)
            sizes = bank.masks(value).sum(1)
            self._log.append({"label": label, "cross_term": f"pca-locality/{route}", "device": str(x.device),
                              "fold": fold_path(self.dtype, x.device, False),
                              "alpha_bar": [float(value)] * len(rows), "neglected_bound": 0.0,
                              "mask_size_min": int(sizes.min()), "mask_size_max": int(sizes.max()),
                              "mask_size_mean": float(sizes.double().mean())})
        return out.reshape(x.shape).to(x.dtype)

    def _fold(self, bank: LocalityBank, x: Tensor, value: float, route: str) -> Tensor:
        """x̂₀ [B, D] (float64) of samples x [B, ...] at one ᾱ.

        Per chunk of n training images: the squared differences Δ²[n', b, j] = (x_b,n' − a·y_j,n')² (difference
        form, as the released code: no cancellation in float32), their masked sums ℓ[m, b, j] =
        −Σ_{n' ∈ mask_m} Δ²[n', b, j] / (2s²T) — 'dense': one GEMM mask @ Δ²; 'sparse': `embedding_bag` sums of
        each mask's rows — and the engine's streaming log-sum-exp over j (`kernels.accumulate`), the logits
        entering as the per-key bias of one group per (coordinate m, sample b) against a zero query, the
        values y_j,m."""
        b, d = x.shape[0], math.prod(self.image_shape)
        a, s2 = noise_coefficients(torch.tensor([value], dtype=torch.float64))
        a, scale = float(a), -1.0 / (2 * float(s2) * self.temperature)
        xt = x.detach().reshape(b, d).T.to(self.dtype).contiguous()                     # [D, B]
        images = bank.images.reshape(bank.images.shape[0], d)
        if route == "dense":
            mask = bank.masks(value).to(self.dtype)                                     # [D_m, D_n]
        else:
            columns, offsets = bank.bag(value)
        itemsize = torch.finfo(self.dtype).bits // 8
        chunk = max(1, int(self.memory_budget // (8 * itemsize * b * d)))   # Δ², sums, bias, values, exp
        state = kernels.init_state((d, b, 1), 1, self.dtype, x.device)
        query = torch.zeros(d, b, 1, 1, dtype=self.dtype, device=x.device)
        for start in range(0, images.shape[0], chunk):
            yt = images[start:start + chunk].T.to(self.dtype).contiguous()              # [D, n]
            n = yt.shape[1]
            # row-major [D_n, B·n]: the sparse sums read whole rows
            delta = ((xt[:, :, None] - a * yt[:, None, :]) ** 2).contiguous().reshape(d, b * n)
            if route == "dense":
                summed = mask @ delta                                                   # [D_m, B·n]
            else:
                summed = F.embedding_bag(columns, delta, offsets, mode="sum")           # [D_m, B·n]
            bias = (summed * scale).reshape(d, b, n)
            values = yt[:, None, :, None].expand(d, b, n, 1)
            state = kernels.accumulate(state, query, yt.new_zeros(n, 1), bias, values, 1.0, key_offset=start)
        return kernels.finalize(state)[:, :, 0, 0].T.to(torch.float64)                  # [B, D]


@register_model("pca-locality")
def build_pca_locality(data: ImageSet, tau: float = 0.02, temperature: float = 1.0, convention: str = "studio",
                       conditional: bool = False, dtype: torch.dtype | str = torch.float32,
                       memory_budget: float = DEFAULT_MEMORY_BUDGET, route: str = "auto") -> Denoiser:
    """PCA-locality (Lukoianov et al. 2025): per-pixel masks from the Wiener filter, thresholded at τ·max
    (τ = 0.02; 0.05 for CIFAR-10 in the paper), posterior over training images with masked distances;
    temperature divides the logits; convention 'studio' (the released code) or 'row' (module docstring);
    route 'auto', 'sparse' or 'dense' (module docstring); conditional=True: each class's own covariance and
    images."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau <= 1:
        raise ModelConfigError(f"pca-locality: tau must lie in (0, 1], got {tau!r} (the masks are binary)")
    if convention not in CONVENTIONS:
        raise ModelConfigError(f"pca-locality: convention must be one of {CONVENTIONS}, got {convention!r}")
    if route not in ROUTES:
        raise ModelConfigError(f"pca-locality: route must be one of {ROUTES}, got {route!r}")
    return PCALocality(data, float(tau), check_temperature(temperature), convention, conditional,
                       resolve_dtype(dtype), memory_budget, route)

