"""External diffusion models behind the one denoiser call, and scorefield denoisers as k-diffusion models.

    sf.models.adapters.from_diffusers(unet, scheduler)   # diffusers UNet2DModel + its scheduler -> Denoiser
    sf.models.adapters.from_edm(D)                       # EDM / k-diffusion D(x_ve, σ) -> Denoiser
    sf.models.adapters.to_k_diffusion(model)             # Denoiser -> k-diffusion model(x_ve, σ) -> denoised

The conversions are those of DESIGN's call convention: a scorefield denoiser maps the VP state
x = √ᾱ·x₀ + √(1−ᾱ)·ε and ᾱ to x̂₀; EDM and k-diffusion write the same state as x_ve = x₀ + σ·ε with
σ = √((1−ᾱ)/ᾱ), so ᾱ = 1/(1+σ²) and x_ve = x/√ᾱ, and their D(x_ve, σ) is the same x̂₀. The adapted models are
`Denoiser`s, so every sampler and analysis of the toolkit takes them unchanged.

Neither diffusers nor k-diffusion is imported here: `from_diffusers` only duck-types the objects it is given
(install the `adapters` extra, `pip install -e ".[adapters]"`, to build them), and `to_k_diffusion` writes to
k-diffusion's model interface without importing it, so its samplers (`k_diffusion.sampling.sample_*`) and any
code written for its wrappers (`sigmas`, `sigma_min`, `sigma_max`, `get_sigmas`) run scorefield denoisers.
"""
from __future__ import annotations

from .diffusers_unet import DiffusersDenoiser, from_diffusers
from .edm import EDMDenoiser, from_edm
from .errors import AdapterError
from .kdiffusion import KDiffusionModel, to_k_diffusion

__all__ = ["AdapterError", "DiffusersDenoiser", "EDMDenoiser", "KDiffusionModel", "from_diffusers", "from_edm",
           "to_k_diffusion"]
