"""Denoising score matching under a component process (the `process=` option of `sf.training.train`).

The loss is the toolkit's ε-prediction loss (kamb-ganguli eq. 27) with the process's marginal in place of the VP one:

    x_t = Qᵀ(m ⊙ Q x₀ + √v ⊙ Q ε),   L = E ‖ê_θ(x_t, t) − Qᵀ(S ⊙ Q ε)‖²  (prediction 'eps')
                                      L = E ‖x̂_θ(x_t, t) − x₀‖²          (prediction 'x0')

with t drawn as the toolkit draws it (uniform or log-uniform on the process's time range), ε white in pixel space
(Q ε is white in component space) and S the noise colour (`process.eps_scale`: the net predicts the noise in data
units, white ε for S = I). Components absent from x_t (v_k = 0) get the target 0, their conditional mean. The
network sees the time through `process.time_label`. With the free theory the
network's output is added to the analytic Gaussian part (`forward.denoisers.network_output`).

For the standard process (equal ᾱ_k, S = I, pixel basis) the random draws, the arithmetic and hence the trained
weights are bit for bit those of the standard loss (tests/test_forward.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .denoisers import network_output
from .process import ComponentProcess, ProcessError

Tensor = torch.Tensor


class _TimeRange:
    """The t_min / t_max that `training.sample_times` reads from a schedule."""

    def __init__(self, t_min: float, t_max: float) -> None:
        self.t_min, self.t_max = t_min, t_max


def process_loss(process: ComponentProcess) -> Callable[..., Tensor]:
    """A loss with `training.dsm_loss`'s signature (model, x0, labels, config, schedule, generator) that trains
    under `process` with its parametrization (prediction, free_theory)."""
    from ..training import sample_times

    times = _TimeRange(process.t_min, process.t_max)

    def loss(model: Any, x0: Tensor, labels: Tensor | None, config: Any, schedule: Any,
             generator: torch.Generator) -> Tensor:
        batch = x0.shape[0]
        t = sample_times(times, batch, config.time_sampling, generator, x0.device)      # [B] float64
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = process.noise_with(x0, t, eps)
        if model.conditional:
            drop = torch.rand(batch, generator=generator, device=x0.device) < config.label_dropout
            labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
        out = network_output(model, x_t, t, process, labels, process.prediction, process.free_theory)
        target = process.eps_target(eps) if process.prediction == "eps" else x0
        if process.prediction == "eps":
            target = _drop_absent_noise(process, target, t)
        return (out - target).pow(2).mean()

    return loss


def _drop_absent_noise(process: ComponentProcess, target: Tensor, t: Tensor) -> Tensor:
    """The ε target with the components that x_t does not contain (v_k(t) = 0: exactly clean, e.g. the coarse shells
    of a scale-by-scale process before their window) replaced by their conditional mean 0. Same minimizer
    (E[ε_k | x_t] = 0 there), without the irreducible noise that would otherwise dominate the loss (a clean k = 0
    component under matched noise carries S_k² ≈ 6 on φ⁴ against ≈ 0.02 per high-|k| one). A no-op, bit for bit,
    when every component is noised (the standard process at t > t_min)."""
    _, sd = process.noise_scales(t.cpu(), torch.float64, torch.device("cpu"))            # [B, D]
    present = sd > 0
    if bool(present.all()):
        return target
    c = process.basis.forward(target) * present.to(device=target.device, dtype=target.dtype)
    return process.basis.inverse(c)


def training_hook(process: Any, free_theory: bool | None, data: Any, model: Any
                  ) -> tuple[ComponentProcess | None, dict[str, Any] | None, Callable[..., Tensor] | None]:
    """What `training.train(process=..., free_theory=...)` needs: the process (rebuilt from a spec dict, as saved
    in a run's config, on `data`), its spec for the config, and the loss. (None, None, None) without a process."""
    from .presets import from_spec

    if process is None:
        if free_theory:
            raise ProcessError("free_theory=True needs a forward process (process=sf.forward.make(...))")
        return None, None, None
    if isinstance(process, str):
        from .presets import make

        process = make(process, data)
    elif isinstance(process, dict):
        process = from_spec(process, data)
    if not isinstance(process, ComponentProcess):
        raise ProcessError(f"process must be an sf.forward process, a name or a spec dict, got "
                           f"{type(process).__name__}")
    if free_theory is not None:
        process = process.parametrized(free_theory=free_theory)
    if tuple(process.image_shape) != tuple(model.image_shape):
        raise ProcessError(f"the process is for images {process.image_shape}, the model for {model.image_shape}")
    return process, process.spec(), process_loss(process)


def mark_trained(model: Any, process: ComponentProcess | None) -> None:
    """Record on the trained net how it is parametrized, so that sampling under the process reads it alike."""
    if process is not None:
        model.process_parametrization = {"prediction": process.prediction, "free_theory": process.free_theory}
        model.process = process
