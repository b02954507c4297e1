"""The one denoiser interface: model(x [B, C, H, W], alpha_bar [B], labels=None) -> x0_hat [B, C, H, W].

x is a noisy VP image x = √ᾱ·x₀ + √(1−ᾱ)·ε and the output is the posterior-mean estimate x̂₀.
"""
from __future__ import annotations

from typing import Any

import torch


class DenoiserInputError(ValueError):
    """A denoiser was called with inputs of the wrong shape, range or kind."""


def check_denoiser_inputs(x: torch.Tensor, alpha_bar: torch.Tensor | float,
                          labels: torch.Tensor | None = None,
                          image_shape: tuple[int, int, int] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate and normalize a denoiser call; returns (x [B,C,H,W], alpha_bar [B] (x's dtype), labels [B] | None)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DenoiserInputError(f"x must be a [B, C, H, W] tensor, got {shape}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise DenoiserInputError(
            f"x has image shape {tuple(x.shape[1:])} but this denoiser was built for {tuple(image_shape)}")
    if not torch.isfinite(x).all():
        raise DenoiserInputError("x contains NaN or infinite values")
    batch = x.shape[0]
    ab = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
    if ab.ndim == 0:
        ab = ab.expand(batch)
    ab = ab.reshape(-1)
    if ab.shape[0] != batch:
        raise DenoiserInputError(f"alpha_bar must be a scalar or have shape [B]=[{batch}], got {tuple(ab.shape)}")
    if not torch.isfinite(ab).all() or (ab < 0).any() or (ab > 1).any():
        raise DenoiserInputError(f"alpha_bar must lie in [0, 1], got range [{ab.min().item()}, {ab.max().item()}]")
    if labels is not None:
        labels = torch.as_tensor(labels, device=x.device).to(torch.int64).reshape(-1)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.shape[0] != batch:
            raise DenoiserInputError(f"labels must have shape [B]=[{batch}], got {tuple(labels.shape)}")
    return x, ab, labels


class Denoiser(torch.nn.Module):
    """Base class of every denoiser (analytic machines and trained networks).

    Subclasses implement `denoise(x, alpha_bar, labels)` on validated inputs; calling the model validates
    first. `config` holds the plain-data options that rebuild the model with `sf.models.make`.
    """

    name: str = "denoiser"
    conditional: bool = False
    # True when labels=None is meaningful for a conditional denoiser: the unconditional model (the null class
    # of a network trained with label dropout; the machine over all classes' images). Classifier-free
    # guidance needs it.
    unconditional_without_labels: bool = False

    def __init__(self, image_shape: tuple[int, int, int], config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.config: dict[str, Any] = dict(config or {})

    def denoise(self, x: torch.Tensor, alpha_bar: torch.Tensor,
                labels: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate_call(self, x: torch.Tensor, alpha_bar: torch.Tensor | float, labels: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Check a call's inputs against this denoiser (shape, range, labels when conditional)."""
        x, ab, labels = check_denoiser_inputs(x, alpha_bar, labels, self.image_shape)
        if self.conditional and labels is None and not self.unconditional_without_labels:
            raise DenoiserInputError(f"{self.name} is class-conditional: pass labels=[B] class indices")
        if labels is not None and not self.conditional:
            raise DenoiserInputError(f"{self.name} is unconditional but labels were given (they would be ignored); "
                                     "build it with conditional=True or pass labels=None")
        return x, ab, labels

    def forward(self, x: torch.Tensor, alpha_bar: torch.Tensor | float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(*self.validate_call(x, alpha_bar, labels))

    def _apply(self, fn, recurse=True):  # noqa: ANN001  (torch's signature)
        # `.to(device)`, `.cuda()`, `.cpu()` reach every Module through `_apply`; state that is not a parameter or
        # buffer (the banks of analytic machines) follows through `move_state`.
        out = super()._apply(fn, recurse)
        self.move_state(fn(torch.empty(0)).device)
        return out

    def move_state(self, device: torch.device) -> None:
        """Move non-parameter state (e.g. training images, banks) to `device`; nothing by default."""

    def engine_log(self) -> list[dict[str, Any]]:
        """The engine calls since the last call of this method (route, implementation, device, bounds; see
        `scorefield.experiments.engine_log`), and forget them. Denoisers without an engine return []."""
        return []

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, config={self.config}"
