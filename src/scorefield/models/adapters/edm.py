"""An EDM / k-diffusion-style denoiser D(x_ve, σ) as a scorefield denoiser.

EDM (Karras et al. 2022, eq. 1–2 and Table 1) and k-diffusion write the noisy state in the variance-exploding
form x_ve = x₀ + σ·n and their denoiser D(x_ve; σ) returns x̂₀. The VP state of the call convention,
x = √ᾱ·x₀ + √(1−ᾱ)·ε, is the same state scaled: x = √ᾱ·x_ve with ᾱ = 1/(1+σ²) (σ = √((1−ᾱ)/ᾱ), the VP
process's "s(t)σ(t)" form, EDM eq. 4 / Table 1 with s = √ᾱ). So

    model(x, ᾱ) = D(x/√ᾱ, √((1−ᾱ)/ᾱ))

and x̂₀ needs no conversion. At ᾱ = 1 (σ = 0, no noise) the posterior mean is x itself and D is not called (EDM's
preconditioning takes log σ); ᾱ below 10⁻⁴ is evaluated at 10⁻⁴ (σ ≈ 100, past EDM's σ_max = 80), the same
floor as the toolkit's nets, where x/√ᾱ would otherwise blow up.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..base import Denoiser
from ..nets import ALPHA_BAR_FLOOR
from .errors import AdapterError

PADDINGS = ("zeros", "circular")


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = √((1−ᾱ)/ᾱ), EDM's noise level of the VP ᾱ (inverse of ᾱ = 1/(1+σ²))."""
    ab = torch.as_tensor(alpha_bar)
    return ((1 - ab) / ab).clamp_min(0).sqrt()


class EDMDenoiser(Denoiser):
    """D(x_ve, σ, **labels) → x̂₀ behind the denoiser call (module docstring). Build it with `from_edm(D)`."""

    name = "edm"

    def __init__(self, D: Callable[..., torch.Tensor], image_shape: tuple[int, int, int], conditional: bool = False,
                 label_kwarg: str = "class_labels", one_hot: bool = False, num_classes: int | None = None,
                 unconditional_without_labels: bool = True, padding: str = "zeros") -> None:
        if padding not in PADDINGS:
            raise AdapterError(f"from_edm: padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        if one_hot and not num_classes:
            raise AdapterError("from_edm: one_hot labels need num_classes")
        config = {"name": "edm", "D": type(D).__name__, "conditional": bool(conditional),
                  "label_kwarg": label_kwarg if conditional else None,
                  "one_hot": bool(one_hot) if conditional else None, "num_classes": num_classes, "padding": padding}
        super().__init__(image_shape, config)
        self.D = D   # a Module is registered (it moves with .to(), its parameters are ours); else a plain callable
        self.conditional = bool(conditional)
        self.unconditional_without_labels = bool(unconditional_without_labels)
        self.label_kwarg = label_kwarg
        self.one_hot = bool(one_hot)
        self.num_classes = num_classes
        self.padding = padding

    def _kwargs(self, labels: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        if labels is None or not self.conditional:
            return {}
        if self.one_hot:
            return {self.label_kwarg: torch.nn.functional.one_hot(labels, int(self.num_classes)).to(dtype)}
        return {self.label_kwarg: labels}

    def denoise(self, x: torch.Tensor, alpha_bar: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        D = self.D
        dtype = next((p.dtype for p in D.parameters()), x.dtype) if isinstance(D, torch.nn.Module) else x.dtype
        ab = alpha_bar.to(torch.float64).clamp_min(ALPHA_BAR_FLOOR)         # [B]
        sigma = sigma_from_alpha_bar(ab)                                      # [B] float64
        noisy = sigma > 0                                                     # σ = 0: x̂₀ = x, D not called
        if not noisy.any():
            return x
        rows = noisy.nonzero().reshape(-1) if not noisy.all() else None
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])       # noqa: E731
        x_ve = (pick(x).to(torch.float64) / pick(ab).sqrt().reshape(-1, 1, 1, 1)).to(dtype)   # [b, C, H, W]
        kwargs = self._kwargs(None if labels is None else pick(labels), dtype)
        out = D(x_ve, pick(sigma).to(dtype), **kwargs)
        out = getattr(out, "sample", out).to(x.dtype)                       # [b, C, H, W] = x̂₀
        if tuple(out.shape) != tuple(pick(x).shape):
            raise AdapterError(f"from_edm: D returned shape {tuple(out.shape)} for inputs {tuple(pick(x).shape)}")
        if rows is None:
            return out
        return x.index_put((rows,), out)                                      # σ = 0 rows keep x


def from_edm(D: Callable[..., torch.Tensor], image_shape: tuple[int, int, int] | None = None, *,
             conditional: bool | None = None, label_kwarg: str | None = None, one_hot: bool | None = None,
             num_classes: int | None = None, padding: str | None = None) -> EDMDenoiser:
    """An EDM / k-diffusion-style denoiser D(x_ve, σ[B]) → x̂₀ as a scorefield denoiser (module docstring).

        D = k_diffusion.layers.Denoiser(inner, sigma_data=0.5)    # or NVlabs/edm's EDMPrecond, or any function
        model = sf.models.adapters.from_edm(D, image_shape=(1, 28, 28))

    image_shape (C, H, W): default from D's `image_shape`, or EDM's `img_channels` / `img_resolution`.
    Labels: EDM networks (`label_dim` > 0) get one-hot `class_labels`, a model from `to_k_diffusion` gets its
    `labels`; otherwise set conditional=True and name D's keyword (label_kwarg, default 'class_labels'), with
    one_hot=True and num_classes for one-hot vectors. labels=None calls D without the keyword. padding: how the
    analyses should read D's convolutions (default 'zeros', or the wrapped scorefield model's).
    """
    inner = getattr(D, "inner_model", None)
    from .kdiffusion import KDiffusionModel

    if isinstance(D, KDiffusionModel):                                    # a scorefield denoiser made k-diffusion's
        defaults: dict[str, Any] = dict(conditional=inner.conditional, label_kwarg=D.label_kwarg, one_hot=False,
                                        num_classes=getattr(inner, "num_classes", None),
                                        unconditional_without_labels=inner.unconditional_without_labels,
                                        padding=(getattr(inner, "config", {}) or {}).get("padding") or "zeros")
    elif getattr(D, "label_dim", None) is not None:                       # NVlabs/edm's preconditioned networks
        label_dim = int(D.label_dim)
        defaults = dict(conditional=label_dim > 0, label_kwarg="class_labels", one_hot=label_dim > 0,
                        num_classes=label_dim or None, unconditional_without_labels=True, padding="zeros")
    else:
        defaults = dict(conditional=bool(num_classes), label_kwarg="class_labels", one_hot=False,
                        num_classes=num_classes, unconditional_without_labels=True, padding="zeros")
    given = dict(conditional=conditional, label_kwarg=label_kwarg, one_hot=one_hot, num_classes=num_classes,
                 padding=padding)
    options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    if not callable(D):
        raise AdapterError(f"from_edm: D must be callable as D(x, sigma) -> denoised, got {type(D).__name__}")
    return EDMDenoiser(D, _image_shape(D, image_shape), **options)


def _image_shape(D: Any, image_shape: Any) -> tuple[int, int, int]:
    shape = image_shape if image_shape is not None else getattr(D, "image_shape", None)
    if shape is None and getattr(D, "img_resolution", None) is not None:
        shape = (D.img_channels, D.img_resolution, D.img_resolution)
    if shape is None:
        raise AdapterError(f"from_edm: cannot tell the image shape of {type(D).__name__}; pass image_shape=(C, H, W)")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise AdapterError(f"from_edm: image_shape must be (C, H, W), got {image_shape!r}")
    return shape  # type: ignore[return-value]
