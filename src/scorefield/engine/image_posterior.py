"""The whole-image machines on the engine: IS (posterior over training images, kamb-ganguli eq. 3–4) and ES
(over all their circular translates, eq. 5–6), streamed in chunks of images so memory is bounded for any N."""
from __future__ import annotations

import torch

from .banks import WholeImages
from .posterior import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TOPK,
    differentiable_posterior,
    noise_coefficients,
    softmax_posterior,
)

Tensor = torch.Tensor


def image_posterior(x: Tensor, alpha_bar: Tensor | float, images: Tensor, *, translates: bool = False,
                    log_weights: Tensor | None = None, dtype: torch.dtype = torch.float32,
                    topk: int = DEFAULT_TOPK, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                    chunk_images: int | None = None, return_provenance: bool = False,
                    ) -> Tensor | tuple[Tensor, Tensor]:
    """Posterior mean over whole training images [N, C, H, W] (IS), or over all their circular translates (ES),
    of noisy images x [B, C, H, W] at ᾱ [B], on x's device (the images move there). With return_provenance
    also [B, 3] (image, shift y, shift x). When x requires grad (and grad mode is on) the result is
    differentiable in x (float64 reference fold; see `posterior.differentiable_posterior`)."""
    b, n = x.shape[0], images.shape[0]
    device = x.device
    logw = (torch.zeros(n, dtype=torch.float64, device=device) if log_weights is None
            else torch.as_tensor(log_weights, dtype=torch.float64, device=device))
    source = WholeImages(images.detach().to(device=device, dtype=torch.float32), logw, translates=translates)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=device).reshape(-1).expand(b)
    a, s2 = noise_coefficients(ab)
    if torch.is_grad_enabled() and x.requires_grad and not return_provenance:
        mean = differentiable_posterior(x.reshape(1, b, -1).to(torch.float64), a[None], s2[None], source,
                                        memory_budget=memory_budget)
        return mean.reshape(x.shape).to(x.dtype)
    chunk = None if chunk_images is None else int(chunk_images) * source.shifts
    mean, best = softmax_posterior(x.detach().reshape(1, b, -1).to(dtype), a[None], s2[None], source,
                                   dtype=dtype, topk=topk, provenance=return_provenance,
                                   memory_budget=memory_budget, chunk_keys=chunk)
    result = mean.reshape(x.shape).to(x.dtype)
    if return_provenance:
        return result, source.sources(best)[0]
    return result
