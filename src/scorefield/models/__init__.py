"""Everything that denoises, behind one interface (see `base.Denoiser`) and one registry (`make`)."""
from __future__ import annotations

from pathlib import Path

from ..checkpoints import load_denoiser

# each registers its models (theories: Wiener, PCA-locality, smoothed CFDM, PSPC, top-k, nearest); adapters is
# sf.models.adapters (diffusers, EDM / k-diffusion), which imports neither library
from . import adapters, gaussian, machines, nets, theories  # noqa: F401
from .base import Denoiser, DenoiserInputError, check_denoiser_inputs
from .registry import MODELS, ModelConfigError, available_models, make, register_model


def load(run_dir: str | Path) -> Denoiser:
    """The trained denoiser saved in a training run directory (safetensors weights + JSON config)."""
    return load_denoiser(run_dir)


__all__ = ["MODELS", "Denoiser", "DenoiserInputError", "ModelConfigError", "available_models",
           "check_denoiser_inputs", "load", "make", "register_model"]
