"""Smoothed closed-form diffusion (Scarvelis, Sáez de Ocáriz Borde & Solomon 2023, "Closed-form diffusion
models", arXiv 2310.12395): the closed-form (ideal, IS) denoiser smoothed by averaging it over noise-perturbed
copies of its input,
    x̂₀(x) = (1/M) Σ_{i=1..M} D_IS(x + σ_s·ε_i, ᾱ),    ε_i ~ N(0, I),
as the analytic-diffusion-studio computes it (`scfdm`: num_noise M = 10; smoothing_std σ_s = 0.1 for CIFAR-10,
AFHQ and CelebA-HQ, 1 for MNIST and Fashion-MNIST in its configs). D_IS is the engine's exact posterior over
all training images (the studio restricts it to 200 FAISS neighbours); `temperature` divides its logits.

Randomness: the draws ε_i of a sample come from its own generator, seeded by a hash of (seed, the sample's
pixels, its ᾱ) — so a sample's result never depends on the batch it is denoised in or its position there, and
the same input always gives the same output (the smoothed denoiser is a deterministic function of x).
"""
from __future__ import annotations

import torch

from ...data import ImageSet
from ...engine import DEFAULT_MEMORY_BUDGET, DEFAULT_TOPK
from ..base import Denoiser
from ..machines import resolve_dtype
from ..registry import ModelConfigError, register_model
from ._common import TheoryMachine, check_temperature, image_mean, sample_generators

Tensor = torch.Tensor


class SmoothedCFDM(TheoryMachine):
    """The IS denoiser averaged over `num_noise` Gaussian perturbations of its input (module docstring)."""

    def __init__(self, data: ImageSet, num_noise: int, smoothing_std: float, seed: int, temperature: float,
                 conditional: bool, dtype: torch.dtype, memory_budget: float, topk: int) -> None:
        super().__init__(data, "cfdm", conditional, lambda images: images,
                         {"num_noise": num_noise, "smoothing_std": smoothing_std, "seed": seed,
                          "temperature": temperature, "dtype": str(dtype).replace("torch.", "")})
        self.num_noise, self.smoothing_std, self.seed = num_noise, smoothing_std, seed
        self.temperature, self.dtype = temperature, dtype
        self.memory_budget, self.topk = float(memory_budget), int(topk)

    def perturbations(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """The draws ε [B, M, C, H, W] (float64, on x's device) each sample of x gets."""
        gens = sample_generators(x, alpha_bar, self.seed)
        eps = torch.stack([torch.randn((self.num_noise, *x.shape[1:]), generator=g, dtype=torch.float64)
                           for g in gens])
        return eps.to(x.device)

    def _part(self, images: Tensor, x: Tensor, alpha_bar: Tensor, label: int | None) -> Tensor:
        b, m = x.shape[0], self.num_noise
        copies = x.detach().to(torch.float64)[:, None] + self.smoothing_std * self.perturbations(x, alpha_bar)
        flat = copies.reshape(b * m, *x.shape[1:]).to(x.dtype)
        out = image_mean(flat, alpha_bar.repeat_interleave(m), images, temperature=self.temperature,
                         dtype=self.dtype, topk=self.topk, memory_budget=self.memory_budget)
        self._log.append({"label": label, "cross_term": "image", "device": str(x.device), "copies": m,
                          "alpha_bar": alpha_bar.tolist(), "neglected_bound": 0.0})
        return out.reshape(b, m, *x.shape[1:]).to(torch.float64).mean(1).to(x.dtype)


@register_model("cfdm")
def build_cfdm(data: ImageSet, num_noise: int = 10, smoothing_std: float = 0.1, seed: int = 0,
               temperature: float = 1.0, conditional: bool = False, dtype: torch.dtype | str = torch.float32,
               memory_budget: float = DEFAULT_MEMORY_BUDGET, topk: int = DEFAULT_TOPK) -> Denoiser:
    """Smoothed closed-form diffusion (Scarvelis et al. 2023): the IS denoiser averaged over num_noise copies of
    its input perturbed by N(0, smoothing_std²) (per-sample, content-seeded draws; seed picks another set)."""
    if isinstance(num_noise, bool) or not isinstance(num_noise, int) or num_noise < 1:
        raise ModelConfigError(f"cfdm: num_noise must be a positive integer, got {num_noise!r}")
    if isinstance(smoothing_std, bool) or not isinstance(smoothing_std, (int, float)) or not smoothing_std >= 0:
        raise ModelConfigError(f"cfdm: smoothing_std must be a non-negative number, got {smoothing_std!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ModelConfigError(f"cfdm: seed must be an integer, got {seed!r}")
    return SmoothedCFDM(data, num_noise, float(smoothing_std), seed, check_temperature(temperature), conditional,
                        resolve_dtype(dtype), memory_budget, topk)
