"""What calibration and prediction need to know about the denoiser they explain: its padding, labels, and a
plain-data description for run configs. Works for trained nets and analytic machines alike."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import ImageSet
from ..models import Denoiser, ModelConfigError


def denoiser_padding(model: Denoiser) -> str:
    """The boundary handling of `model` ('zeros' | 'circular'): its config's padding, else 'zeros'."""
    padding = getattr(model, "config", {}).get("padding") or getattr(model, "padding", None) or "zeros"
    if padding not in ("zeros", "circular"):
        raise ModelConfigError(f"cannot tell the padding of {type(model).__name__} (got {padding!r}); pass "
                               f"padding='zeros' or 'circular'")
    return padding


def matched_conditioning(network: Denoiser, theory: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` for building `theory` to compare with `network`: a class-conditional network is compared with
    class-conditional theories (one bank per class, driven by the same labels), unless `options` set
    `conditional` themselves or the theory has no such option."""
    import inspect

    from ..models.registry import MODELS

    builder = MODELS.get(theory)
    if (not getattr(network, "conditional", False) or "conditional" in options or builder is None
            or "conditional" not in inspect.signature(builder).parameters):
        return options
    return {**options, "conditional": True}


def describe_denoiser(model: Denoiser) -> dict[str, Any]:
    """{"name", "config"} of a denoiser, for run configs."""
    return {"name": str(getattr(model, "config", {}).get("name", getattr(model, "name", type(model).__name__))),
            "config": dict(getattr(model, "config", {}))}


def resolve_labels(model: Denoiser, labels: Sequence[int] | None, n: int, data: ImageSet) -> torch.Tensor | None:
    """Labels [n] for a conditional model (given, or cycling over the data's classes); None otherwise."""
    if labels is not None:
        out = torch.as_tensor(list(labels), dtype=torch.int64).reshape(-1)
        if out.numel() == 1:
            out = out.expand(n).clone()
        if out.numel() != n:
            raise ModelConfigError(f"{out.numel()} labels given for {n} seeds")
        return out
    if getattr(model, "conditional", False):
        if data.num_classes == 0:
            raise ModelConfigError("the model is class-conditional but the data has no labels")
        return torch.arange(n) % data.num_classes
    return None


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, refusing a CUDA device that torch does not see here."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device '{device}' was asked for but torch sees no CUDA device here")
    return dev


def run_device(network: Denoiser, device: str | torch.device | None) -> torch.device:
    """Where an experiment runs: `device` (the network is moved there) or, when None, the network's own device
    (its first parameter or buffer; the CPU for a denoiser with neither). The machines follow their input there
    (`Denoiser` moves its bank on a call from another device)."""
    if device is not None:
        dev = check_device(device)
        network.to(dev)
        return dev
    for tensor in (*network.parameters(), *network.buffers()):
        return tensor.device
    return torch.device("cpu")
