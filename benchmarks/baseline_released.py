"""A baseline ELS denoiser that follows the algorithm of the papers' released code (for timing comparisons).

Per denoiser call it makes one full pass over the training set, chunk by chunk of training images:
  1. the cross term q·k of every query patch with every bank patch is a conv2d of the (circularly padded)
     noisy images with the chunk's patches as filters: [B, K, H, W];
  2. the logits (a/s²)·q·k − (a²/2s²)‖k‖² (kamb-ganguli eq. 10 / 40; ‖q‖² cancels) are folded into a running
     max and weight sum per query pixel;
  3. the numerator is the broadcast product weights [B, K, 1, H, W] × centre pixels [1, K, C, 1, 1], summed
     over K.
Unlike the released code it keeps one softmax max per query pixel (not per batch) and uses the circularly
padded bank of all H·W patches per image (the theory of App. B.1), so that it computes the same function as
scorefield's ELS machine and its error can be compared. Nothing is cached between calls.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class ReleasedStyleELS:
    """model(x [B, C, H, W], alpha_bar [B], labels=None) -> x̂₀ [B, C, H, W] (float32, one pass per call)."""

    def __init__(self, images: Tensor, patch_size: Callable[[float], int], chunk_images: int = 4) -> None:
        self.images = images.detach().to(torch.float32)          # [N, C, H, W]
        self.patch_size = patch_size
        self.chunk_images = int(chunk_images)

    def __call__(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None = None) -> Tensor:
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = torch.empty_like(x)
        for value in ab.unique():
            idx = (ab == value).nonzero()[:, 0]
            out[idx] = self._denoise(x[idx].to(torch.float32), float(value)).to(x.dtype)
        return out

    def _denoise(self, x: Tensor, alpha_bar: float) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch_size(alpha_bar)
        r = p // 2
        a, s2 = alpha_bar**0.5, max(1.0 - alpha_bar, 1e-10)
        x_pad = F.pad(x, (r, r, r, r), mode="circular")                              # [B, C, H+2r, W+2r]
        m = torch.full((b, 1, h, w), -torch.inf)
        denom = torch.zeros(b, 1, h, w)
        numer = torch.zeros(b, c, h, w)
        for start in range(0, self.images.shape[0], self.chunk_images):
            chunk = self.images[start:start + self.chunk_images]
            n = chunk.shape[0]
            pad = F.pad(chunk, (r, r, r, r), mode="circular")
            filters = F.unfold(pad, p).transpose(1, 2).reshape(n * h * w, c, p, p)    # [K, C, P, P]
            centres = chunk.permute(0, 2, 3, 1).reshape(n * h * w, c)                # [K, C]
            cross = F.conv2d(x_pad, filters)                                         # [B, K, H, W]
            norms = filters.pow(2).sum((1, 2, 3))                                    # [K]
            logits = (a / s2) * cross - (a * a / (2 * s2)) * norms[None, :, None, None]
            m_new = torch.maximum(m, logits.amax(1, keepdim=True))
            rescale = torch.exp(m - m_new)
            weights = torch.exp(logits - m_new)                                      # [B, K, H, W]
            denom = denom * rescale + weights.sum(1, keepdim=True)
            numer = numer * rescale + (weights[:, :, None] * centres[None, :, :, None, None]).sum(1)
            m = m_new
        return numer / denom
