"""Gaussian (free-theory) denoisers: the exact posterior mean E[x₀ | x] for Gaussian data.

For x₀ ~ N(μ, Σ) and x = a·x₀ + s·ε (a = √ᾱ, s² = 1−ᾱ), the posterior mean is the Wiener filter
    x̂₀ = μ + a Σ (a² Σ + s² I)⁻¹ (x − a μ) = μ + U diag(a λ / (a² λ + s²)) Uᵀ (x − a μ),  Σ = U diag(λ) Uᵀ.
A stationary (circulant) covariance is diagonal in the Fourier basis, so the same filter acts per frequency.
"""
from __future__ import annotations

import torch

from ..data import ImageSet
from ..engine.memory import check_fits
from .base import Denoiser
from .registry import ModelConfigError, register_model

Tensor = torch.Tensor


def wiener_gain(eigenvalues: Tensor, alpha_bar: Tensor) -> Tensor:
    """a λ / (a² λ + s²) per eigenvalue: eigenvalues [..., K], alpha_bar [B] -> [B, ..., K]."""
    shape = (-1,) + (1,) * eigenvalues.ndim
    ab = alpha_bar.reshape(shape).to(eigenvalues.dtype)
    return ab.sqrt() * eigenvalues / (ab * eigenvalues + (1 - ab))


class GaussianDenoiser(Denoiser):
    """Exact posterior mean for x₀ ~ N(mean, U diag(λ) Uᵀ) with a full (eigendecomposed) covariance."""

    name = "gaussian"

    def __init__(self, mean: Tensor, cov: Tensor, image_shape: tuple[int, int, int]) -> None:
        super().__init__(image_shape)
        d = mean.numel()
        if cov.shape != (d, d):
            raise ModelConfigError(f"covariance must be [{d}, {d}] for images of shape {image_shape}, "
                                   f"got {tuple(cov.shape)}")
        cov64 = 0.5 * (cov + cov.T).to(torch.float64)
        lam, U = torch.linalg.eigh(cov64)
        self.register_buffer("mean", mean.reshape(-1).to(torch.float64))
        self.register_buffer("eigenvalues", lam.clamp_min(0))       # [D]
        self.register_buffer("eigenvectors", U)                      # [D, D]

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)                      # [B, D]
        a = alpha_bar.to(torch.float64).sqrt()[:, None]
        coeff = (xf - a * self.mean) @ self.eigenvectors             # [B, D] in the eigenbasis
        x0 = self.mean + (wiener_gain(self.eigenvalues, alpha_bar) * coeff) @ self.eigenvectors.T
        return x0.reshape(x.shape).to(x.dtype)


class FourierGaussianDenoiser(Denoiser):
    """Exact posterior mean for a stationary Gaussian field with per-channel mean μ_c and power spectrum
    λ_c(k) (periodic boundaries), applied per frequency with the FFT."""

    name = "gaussian-fourier"

    def __init__(self, mean: Tensor, spectrum: Tensor, image_shape: tuple[int, int, int]) -> None:
        super().__init__(image_shape)
        C, H, W = image_shape
        if spectrum.shape != (C, H, W):
            raise ModelConfigError(f"spectrum must be [C, H, W] = {(C, H, W)}, got {tuple(spectrum.shape)}")
        self.register_buffer("mean", mean.reshape(C, 1, 1).to(torch.float64))  # [C, 1, 1]
        self.register_buffer("spectrum", spectrum.to(torch.float64).clamp_min(0))  # [C, H, W] eigenvalues

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        a = alpha_bar.to(torch.float64).sqrt().reshape(-1, 1, 1, 1)
        centred = torch.fft.fft2(x.to(torch.float64) - a * self.mean)            # [B, C, H, W] complex
        x0 = self.mean + torch.fft.ifft2(wiener_gain(self.spectrum, alpha_bar) * centred).real
        return x0.to(x.dtype)


def empirical_spectrum(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean [C] and mean power spectrum [C, H, W] (eigenvalues of the circulant covariance)."""
    x = images.to(torch.float64)
    mean = x.mean(dim=(0, 2, 3))
    H, W = x.shape[-2:]
    power = torch.fft.fft2(x - mean.reshape(1, -1, 1, 1)).abs() ** 2 / (H * W)
    return mean, power.mean(dim=0)


@register_model("gaussian")
def build_gaussian(data: ImageSet, covariance: str = "full", mean: Tensor | None = None,
                   cov: Tensor | None = None, spectrum: Tensor | None = None, shrinkage: float = 0.0) -> Denoiser:
    """The Gaussian denoiser fitted to `data` (or with the given mean / cov / spectrum).

    covariance: 'full' (empirical covariance of the flattened images; `shrinkage` blends in its diagonal
    for a well-conditioned estimate) or 'fourier' (stationary: per-channel mean and mean power spectrum).
    """
    shape = (data.channels, data.height, data.width)
    if covariance == "full":
        d = data.channels * data.height * data.width
        # the D×D covariance in float64, its symmetrized copy and eigenvectors, and eigh's workspace
        check_fits(4.0 * 8 * d * d, "cpu", f"a full {d}×{d} covariance",
                   "use covariance='fourier' (--model-opt covariance=fourier) or smaller images")
        x = data.images.reshape(len(data), -1).to(torch.float64)
        m = x.mean(0) if mean is None else torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        if cov is None:
            if len(data) < 2:
                raise ModelConfigError("a full covariance needs at least 2 images")
            cov = torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])
            if shrinkage:
                cov = (1 - shrinkage) * cov + shrinkage * torch.diag(torch.diagonal(cov))
        model: Denoiser = GaussianDenoiser(m, torch.as_tensor(cov, dtype=torch.float64), shape)
    elif covariance == "fourier":
        m_emp, spec_emp = empirical_spectrum(data.images)
        m = m_emp if mean is None else torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        spec = spec_emp if spectrum is None else torch.as_tensor(spectrum, dtype=torch.float64)
        model = FourierGaussianDenoiser(m, spec, shape)
    else:
        raise ModelConfigError(f"covariance must be 'full' or 'fourier', got '{covariance}'")
    model.config = {"covariance": covariance}
    return model
