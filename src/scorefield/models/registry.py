"""Name → constructor registry behind `sf.models.make(name, data, **options)`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..data import ImageSet
from ..options import closest, unknown_options
from .base import Denoiser

Builder = Callable[..., Denoiser]
MODELS: dict[str, Builder] = {}


class ModelConfigError(ValueError):
    """A model was asked for with an unknown name or invalid options."""


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make `builder(data: ImageSet, **options) -> Denoiser` available as `sf.models.make(name, ...)`."""
    def wrap(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder
    return wrap


def available_models() -> list[str]:
    return sorted(MODELS)


def make(name: str, data: ImageSet, device: torch.device | str | None = None, **options: Any) -> Denoiser:
    """Build the denoiser registered as `name` for the dataset `data` (see DESIGN.md for the names), on
    `device` (default: where `data.images` lives). Machines keep their banks there; every call returns its
    output on the input's device."""
    if name not in MODELS:
        raise ModelConfigError(f"unknown model '{name}'{closest(name, MODELS)}; available: "
                               f"{', '.join(available_models())}")
    if not isinstance(data, ImageSet):
        raise ModelConfigError(f"make('{name}', data): data must be an sf.data.ImageSet, got {type(data).__name__}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ModelConfigError(f"make('{name}', device={device!r}): not a torch device ({exc})") from None
    problem = unknown_options(options, MODELS[name], skip=("data",))
    if problem:
        raise ModelConfigError(f"make('{name}'): {problem}")
    model = MODELS[name](data, **options)
    model.config = {"name": name, **{k: v for k, v in options.items()}, **model.config}
    return model.to(device if device is not None else data.images.device)
