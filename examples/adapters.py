"""Adapters in a minute on a CPU: a diffusers UNet as a scorefield denoiser, an EDM-style D(x, σ) as one, and a
scorefield machine under a k-diffusion sampler. Nothing is downloaded (the UNet is built from a config).

    .venv/bin/pip install -e ".[adapters]"     # diffusers (it keeps your torch)
    .venv/bin/python examples/adapters.py
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

import scorefield as sf
from scorefield.analysis.receptive_field import receptive_field

torch.manual_seed(0)
data = sf.data.ImageSet(torch.rand(32, 1, 16, 16) * 2 - 1, name="noise-images")
noise = sf.sampling.initial_noise(4, (1, 16, 16))

# 1. diffusers: UNet2DModel + its scheduler (ε-, x₀- or v-prediction) -> a scorefield denoiser, two lines
unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=8)
model = sf.models.adapters.from_diffusers(unet, DDPMScheduler(prediction_type="v_prediction"))
with torch.no_grad():
    samples = sf.sampling.sample(model, noise, steps=10, sampler="ddim", schedule="cosine")
print("diffusers UNet, 10 DDIM steps:", tuple(samples.shape), f"range [{samples.min():.2f}, {samples.max():.2f}]")
rf = receptive_field(model, alpha_bars=[0.2, 0.8], n=4, progress=False)
print("its receptive field (P90 patch size) at ᾱ = 0.2, 0.8:", rf.patch_size.tolist())

# 2. EDM / k-diffusion D(x_ve, σ) -> a scorefield denoiser (here the exact D of N(0, λ I) data)
lam = 0.3
edm = sf.models.adapters.from_edm(lambda x, sigma: lam / (lam + sigma[:, None, None, None] ** 2) * x,
                                  image_shape=(1, 16, 16))
ab = torch.tensor([0.5])
x = torch.randn(1, 1, 16, 16)
print("from_edm matches the VP posterior mean √ᾱλ/(ᾱλ+1−ᾱ)·x:",
      torch.allclose(edm(x, ab), (ab.sqrt() * lam / (ab * lam + 1 - ab)) * x, atol=1e-6))

# 3. any scorefield denoiser -> a k-diffusion model (model(x_ve, σ) -> denoised, with sigma_min/max, get_sigmas)
k_model = sf.models.adapters.to_k_diffusion(sf.models.make("els", data, patch_size=5, padding="circular"))
sigmas = k_model.get_sigmas(12)
try:
    from k_diffusion.sampling import sample_heun
except Exception:  # noqa: BLE001  (k-diffusion absent, or its torchvision import broken): Karras Alg. 1 here
    def sample_heun(model, x, sigmas, **_):
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            d = (x - model(x, s * x.new_ones(len(x)))) / s
            x_next = x + d * (s_next - s)
            if s_next > 0:
                x_next = x + (d + (x_next - model(x_next, s_next * x.new_ones(len(x)))) / s_next) / 2 * (s_next - s)
            x = x_next
        return x
with torch.no_grad():
    els_samples = sample_heun(k_model, noise * sigmas[0], sigmas, disable=True)
print(f"ELS machine under Heun from σ = {float(sigmas[0]):.0f}:", tuple(els_samples.shape),
      f"range [{els_samples.min():.2f}, {els_samples.max():.2f}]")
