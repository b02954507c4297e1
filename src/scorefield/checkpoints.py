"""Safe checkpoints: tensors in safetensors files, everything else in JSON; no pickled objects anywhere.

A training run directory holds
    model.safetensors + model.json        the trained weights (EMA weights when EMA was used) and the model
                                          config that rebuilds the net: what `sf.models.load(run_dir)` reads;
    checkpoint.json                       the latest resumable state: step, epoch, training config, optimizer
                                          hyper-parameters, and the name of its tensor file;
    checkpoints/step-NNNNNNNN.safetensors its tensors: model.*, ema.*, optimizer state optim.<param>.<key>,
                                          and the noise generator state rng.generator (uint8).
Every file is written atomically; checkpoint.json is written after its tensor file, so it never points at a
half-written one, and older tensor files are removed only afterwards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .models.nets import NetDenoiser, net_from_config
from .runs import RunDir, RunError, atomic_write_bytes, read_json_file

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
CHECKPOINT = "checkpoint.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model it should restore."""


@dataclass
class Checkpoint:
    """A resumable training state read back from a run directory."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under `prefix.` with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def _plain(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap at these sizes
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save_safetensors(tensors))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing tensor file {path}")
    try:
        return load_safetensors(path.read_bytes())
    except Exception as exc:   # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None


def read_json(path: Path) -> Any:
    """A JSON file of a run directory, or one CheckpointError naming the file (missing, truncated, not JSON)."""
    return read_json_file(path, CheckpointError)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---- optimizer state without pickle -----------------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors (optim.<param>.<key>) and JSON-ready scalars."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any]) -> None:
    """Load the state split by `optimizer_tensors` back into `optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- writing ---------------------------------------------------------------------------------------------

def save_checkpoint(run: RunDir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, ema: dict[str, torch.Tensor] | None,
                    meta: dict[str, Any]) -> Path:
    """Write the resumable state at `step` (tensor file first, then checkpoint.json, then prune old files)."""
    folder = run.path / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    name = f"step-{step:08d}.safetensors"
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors = {**_plain(model.state_dict(), "model"), **opt_tensors,
               "rng.generator": generator.get_state().to("cpu").clone()}
    if ema is not None:
        tensors.update(_plain(ema, "ema"))
    write_tensors(folder / name, tensors)
    _write_json(run.path / CHECKPOINT, {**meta, "step": int(step), "tensors": f"{CHECKPOINT_DIR}/{name}",
                                        "optimizer": opt_meta})
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def save_model(run: RunDir, model: NetDenoiser, weights: dict[str, torch.Tensor] | None = None,
               info: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors (the given weights, or the model's own) and model.json (config + info)."""
    state = weights if weights is not None else model.state_dict()
    write_tensors(run.path / MODEL_WEIGHTS, {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})
    _write_json(run.path / MODEL_CONFIG, {"model": model.config, **(info or {})})
    return run.path / MODEL_WEIGHTS


# ---- reading ---------------------------------------------------------------------------------------------

def load_checkpoint(run_dir: str | Path | RunDir) -> Checkpoint | None:
    """The latest resumable state of a run, or None when it has none yet."""
    path = Path(run_dir.path if isinstance(run_dir, RunDir) else run_dir)
    meta_path = path / CHECKPOINT
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    tensors = (path / str(meta.get("tensors", ""))).resolve()
    if not tensors.is_relative_to(path.resolve()) or "tensors" not in meta:
        raise CheckpointError(f"{meta_path} names a tensor file outside its run directory: {meta.get('tensors')!r}")
    return Checkpoint(meta, read_tensors(tensors))


def _load_weights(model: NetDenoiser, weights: dict[str, torch.Tensor], source: Path) -> None:
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"weights in {source} do not fit the saved model config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {source} do not fit the saved model config: {exc}") from None


def load_denoiser(run_dir: str | Path | RunDir) -> NetDenoiser:
    """The trained denoiser of a run directory: model.safetensors if training finished, else the latest
    checkpoint (its EMA weights when EMA was used). Returned on the CPU in eval mode."""
    path = Path(run_dir.path if isinstance(run_dir, RunDir) else run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    if (path / MODEL_CONFIG).is_file() and (path / MODEL_WEIGHTS).is_file():
        config = read_json(path / MODEL_CONFIG).get("model")
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / MODEL_CONFIG} holds no 'model' config")
        model = net_from_config(config)
        _load_weights(model, read_tensors(path / MODEL_WEIGHTS), path / MODEL_WEIGHTS)
    else:
        checkpoint = load_checkpoint(path)
        if checkpoint is None:
            raise RunError(f"{path} holds no trained weights (neither {MODEL_WEIGHTS} nor {CHECKPOINT})")
        model = net_from_config(checkpoint.meta["model"])
        weights = checkpoint.group("ema") or checkpoint.group("model")
        _load_weights(model, weights, path / checkpoint.meta["tensors"])
    return model.eval()
