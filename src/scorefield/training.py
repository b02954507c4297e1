"""Denoising score matching with ε-prediction (kamb-ganguli eq. 27) for the nets of `models/nets.py`.

    L(θ) = E_{t, x₀, ε} ‖ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t) − ε‖²

Training writes a run directory (config.json, metrics.jsonl, loss.png + loss.npz, model.safetensors +
model.json, checkpoint.json + checkpoints/) and resumes from its last checkpoint. Resuming reproduces an
uninterrupted run: the data order of epoch e is a permutation seeded by (seed, e), the noise, times and label
dropout come from one generator whose state is checkpointed, and the learning rate is a function of the step.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import tensorboard_log
from .checkpoints import CHECKPOINT, load_checkpoint, restore_optimizer, save_checkpoint, save_model
from .data import ImageSet
from .models.nets import NetDenoiser
from .runs import DeferredInterrupt, RunDir, atomic_write_bytes
from .schedules import Schedule, get_schedule

OPTIMIZERS = ("adam", "adamw")
TIME_SAMPLINGS = ("uniform", "log-uniform")
LOG_UNIFORM_MIN = 1e-3  # log-uniform times start at max(t_min, 1e-3·t_max)

# Training recipes of the papers (and a CPU one); pass as train(model, data, **recipe("...")).
RECIPES: dict[str, dict[str, Any]] = {
    # kamb-ganguli App. C.1: Adam, lr 1e-4, batch 128, ×0.999965 per step, 300 epochs, no weight decay
    "kamb-ganguli": {"optimizer": "adam", "lr": 1e-4, "batch_size": 128, "lr_decay": 0.999965, "epochs": 300,
                     "time_sampling": "uniform", "grad_clip": None},
    # ambrogioni App. F.4: AdamW 2e-4, batch 256, grad clip 1.0, log-uniform times, 30 epochs, constant-β VP
    "criticality": {"optimizer": "adamw", "lr": 2e-4, "batch_size": 256, "lr_decay": 1.0, "epochs": 30,
                    "time_sampling": "log-uniform", "grad_clip": 1.0, "schedule": "constant"},
    # a few thousand CPU steps: larger lr, faster decay, EMA
    "cpu": {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "lr_decay": 0.9993, "epochs": 60,
            "time_sampling": "uniform", "grad_clip": 1.0, "ema": 0.995},
}


class TrainingError(ValueError):
    """Training was asked for with invalid options, or a resume does not match the run it continues."""


def recipe(name: str) -> dict[str, Any]:
    """The options of a training recipe ('kamb-ganguli', 'criticality', 'cpu') for `train(**...)`."""
    if name not in RECIPES:
        raise TrainingError(f"unknown training recipe '{name}'; available: {', '.join(RECIPES)}")
    return dict(RECIPES[name])


@dataclass
class TrainConfig:
    """The options that determine the trained weights (saved with every checkpoint)."""

    epochs: int | None = 1
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-4
    optimizer: str = "adam"
    lr_decay: float = 0.999965
    weight_decay: float = 0.0
    grad_clip: float | None = None
    time_sampling: str = "uniform"
    schedule: str = "cosine"
    ema: float | None = None
    label_dropout: float = 0.1
    seed: int = 0
    process: dict[str, Any] | None = None   # a component forward process (sf.forward; RG slides), as its spec

    # these may change between an interrupted run and its continuation
    RESUMABLE_CHANGES = ("epochs", "steps")

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise TrainingError(f"time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, "
                                f"got '{self.time_sampling}'")
        if self.steps is None and (self.epochs is None or self.epochs < 1):
            raise TrainingError(f"give steps ≥ 1 or epochs ≥ 1, got epochs={self.epochs}, steps={self.steps}")
        if self.steps is not None and self.steps < 1:
            raise TrainingError(f"steps must be ≥ 1, got {self.steps}")
        if self.batch_size < 1:
            raise TrainingError(f"batch_size (--batch-size) must be ≥ 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"lr (--lr) must be a positive finite learning rate, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise TrainingError(f"lr_decay (--lr-decay) must lie in (0, 1], got {self.lr_decay}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise TrainingError(f"ema must be a decay in (0, 1) or None, got {self.ema}")
        if not 0 <= self.label_dropout < 1:
            raise TrainingError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainingError(f"grad_clip must be positive or None, got {self.grad_clip}")

    def total_steps(self, n_images: int) -> int:
        return int(self.steps) if self.steps is not None else int(self.epochs) * steps_per_epoch(n_images,
                                                                                                 self.batch_size)


@dataclass
class TrainResult:
    """What `train` returns: the run directory, the trained model (EMA weights if used) and the loss curve."""

    run: RunDir
    model: NetDenoiser
    steps: int
    final_loss: float
    losses: list[dict[str, float]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.run.path


# ---- pieces ----------------------------------------------------------------------------------------------

def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return math.ceil(n_images / batch_size)


def epoch_permutation(n_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch, a function of (seed, epoch) only, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n_images, generator=g)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Exponential decay per step (kamb-ganguli App. C.1: ×0.999965 each step)."""
    return config.lr * config.lr_decay ** step


def sample_times(schedule: Schedule, batch: int, how: str, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """Training times t [B]: uniform on [t_min, t_max] (eq. 27) or log-uniform (ambrogioni F.4)."""
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if how == "uniform":
        return schedule.t_min + u * (schedule.t_max - schedule.t_min)
    lo = max(schedule.t_min, LOG_UNIFORM_MIN * schedule.t_max)
    return torch.exp(math.log(lo) + u * (math.log(schedule.t_max) - math.log(lo)))


def dsm_loss(model: NetDenoiser, x0: torch.Tensor, labels: torch.Tensor | None, config: TrainConfig,
             schedule: Schedule, generator: torch.Generator) -> torch.Tensor:
    """ε-prediction loss (kamb-ganguli eq. 27) on one batch x0: [B, C, H, W]."""
    batch = x0.shape[0]
    t = sample_times(schedule, batch, config.time_sampling, generator, x0.device)
    alpha_bar = schedule.alpha_bar(t).clamp(0.0, 1.0)  # [B] float64
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    ab = alpha_bar.to(x0.dtype)[:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # eq. 20
    if model.conditional:
        # label dropout: the null class teaches the same net the unconditional prediction
        drop = torch.rand(batch, generator=generator, device=x0.device) < config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
    eps_hat = model.predict_eps(x_t, alpha_bar, labels)
    return (eps_hat - eps).pow(2).mean()


class EMA:
    """Exponential moving average of the parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.state[name].lerp_(value, 1 - self.decay)
            else:
                self.state[name].copy_(value)


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def pick_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device; None: CUDA when torch sees one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- the run directory -----------------------------------------------------------------------------------

def _open_or_create_run(run_dir: str | Path | RunDir | None, out: str | Path, name: str | None,
                        config: dict[str, Any], seed: int, device: torch.device) -> RunDir:
    if isinstance(run_dir, RunDir):
        return run_dir
    if run_dir is not None and (Path(run_dir) / "config.json").is_file():
        return RunDir.open(run_dir)
    if run_dir is not None:
        path = Path(run_dir)
        _clear_unfinished_creation(path)
        return RunDir.create("train", config, root=path.parent, name=path.name, seed=seed, device=str(device))
    return RunDir.create("train", config, root=out, name=name, seed=seed, device=str(device))


def _clear_unfinished_creation(path: Path) -> None:
    """Remove a folder that a process killed inside `RunDir.create` left before its config.json (nothing in it
    but hidden temporaries), so the run is created again under its own name rather than beside it as NAME-1."""
    if path.is_dir() and all(p.name.startswith(".") for p in path.rglob("*") if p.is_file()):
        shutil.rmtree(path)


def _check_resume(saved: dict[str, Any], config: TrainConfig, model: NetDenoiser) -> None:
    if saved["model"] != model.config:
        raise TrainingError(f"cannot resume: the run was trained with model {saved['model']}, "
                            f"but this model is {model.config}")
    now = asdict(config)
    differ = [k for k, v in saved["training"].items() if k not in TrainConfig.RESUMABLE_CHANGES and now.get(k) != v]
    if differ:
        raise TrainingError("cannot resume: training options differ from the saved run: " + ", ".join(
            f"{k} {saved['training'][k]!r} → {now.get(k)!r}" for k in differ))


def _truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    kept = [m for m in run.read_metrics() if m.get("step", 0) <= step]
    text = "".join(json.dumps(m) + "\n" for m in kept)
    atomic_write_bytes(run.path / "metrics.jsonl", text.encode())


def plot_loss(run: RunDir, losses: list[dict[str, float]]) -> None:
    """loss.png (log scale) with the numbers in loss.npz."""
    from .plotting import select_backend

    select_backend()
    import matplotlib.pyplot as plt

    steps = np.array([m["step"] for m in losses], dtype=np.int64)
    values = np.array([m["loss"] for m in losses], dtype=np.float64)
    run.save_arrays("loss", replace=True, step=steps, loss=values)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, values, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("ε-prediction loss (eq. 27)")
    ax.grid(alpha=0.3)
    run.save_figure("loss", fig, replace=True)


# ---- training --------------------------------------------------------------------------------------------

def train(model: NetDenoiser, data: ImageSet, run_dir: str | Path | RunDir | None = None, epochs: int | None = 1,
          steps: int | None = None, batch_size: int = 128, lr: float = 1e-4, optimizer: str = "adam",
          lr_decay: float = 0.999965, grad_clip: float | None = None, time_sampling: str = "uniform",
          schedule: str | None = None, ema: float | None = None, seed: int = 0, checkpoint_every: int = 500,
          resume: bool = True, progress: bool = True, device: str | torch.device | None = None,
          weight_decay: float = 0.0, label_dropout: float = 0.1, log_every: int = 10,
          out: str | Path = "runs", name: str | None = None, data_spec: dict[str, Any] | None = None,
          callback: Callable[[int, float], None] | None = None, process: Any = None,
          free_theory: bool | None = None) -> TrainResult:
    """Train `model` on `data` by denoising score matching (kamb-ganguli eq. 27) into a run directory.

    run_dir: an existing run to resume (its last checkpoint) or a new folder; None creates out/name (or
    out/train-<time>). steps, if given, overrides epochs. schedule: None uses the model's; a different one is
    an error (the net maps ᾱ to its own schedule's time). ema: a decay (e.g. 0.999) or None; the saved
    model.safetensors holds the EMA weights when given. data_spec: how to reload the data (for the CLI).
    callback(step, loss) is called after every step. process: a component forward process (`sf.forward.make`, a
    name, or its spec) to train under instead of the standard one (forward/training.py); free_theory: add the
    Gaussian part of the score analytically, the net learning the correction (RG slides).
    """
    if not isinstance(model, NetDenoiser):
        raise TrainingError(f"train() needs a trainable net (sf.models.make('resnet', ...)), "
                            f"got {type(model).__name__}")
    if not isinstance(data, ImageSet):
        raise TrainingError(f"data must be an sf.data.ImageSet, got {type(data).__name__}")
    if tuple(data.images.shape[1:]) != tuple(model.image_shape):
        raise TrainingError(f"data images are {tuple(data.images.shape[1:])} but the model was built for "
                            f"{tuple(model.image_shape)}")
    if model.conditional and data.labels is None:
        raise TrainingError("a conditional model needs labelled data")
    if schedule is not None and get_schedule(schedule).name != model.schedule.name:
        raise TrainingError(f"schedule '{schedule}' differs from the model's '{model.schedule.name}'; build the "
                            f"model with schedule='{schedule}'")
    from .forward.training import mark_trained, training_hook  # component processes (RG slides)

    process, process_spec, process_loss = training_hook(process, free_theory, data, model)
    config = TrainConfig(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         lr_decay=lr_decay, weight_decay=weight_decay, grad_clip=grad_clip,
                         time_sampling=time_sampling, schedule=model.schedule.name, ema=ema,
                         label_dropout=label_dropout, seed=seed, process=process_spec)
    config.validate()
    for key, value in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise TrainingError(f"{key} (--{key.replace('_', '-')}) must be a positive integer, got {value!r}")
    dev = pick_device(device)
    # without a data_spec the data cannot be reloaded by name (only "dataset" is recorded, not "name")
    spec = data_spec or {"dataset": data.name, "n": len(data), "in_memory": True}
    run = _open_or_create_run(run_dir, out, name, {"model": model.config, "training": asdict(config),
                                                   "data": spec}, seed, dev)
    run.lock()                       # one process per run directory; named in the Ctrl-C resume hint
    try:
        result = _train_loop(model, data, run, config, dev, resume, progress, checkpoint_every, log_every, spec,
                             callback, loss_fn=process_loss or dsm_loss)
        mark_trained(result.model, process)
        return result
    finally:
        run.release()


def _train_loop(model: NetDenoiser, data: ImageSet, run: RunDir, config: TrainConfig, dev: torch.device,
                resume: bool, progress: bool, checkpoint_every: int, log_every: int, spec: dict[str, Any],
                callback: Callable[[int, float], None] | None,
                loss_fn: Callable[..., torch.Tensor] = dsm_loss) -> TrainResult:
    # channels-last convolutions are ≈ 1.5× faster on the CPU; the saved weights are contiguous either way
    model.to(dev, memory_format=torch.channels_last).train()
    images = data.images.to(dev).contiguous(memory_format=torch.channels_last)  # [N, C, H, W]
    labels = data.labels.to(dev) if (model.conditional and data.labels is not None) else None
    n = len(data)
    per_epoch = steps_per_epoch(n, config.batch_size)
    total = config.total_steps(n)
    opt = _make_optimizer(model, config)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    ema = EMA(model, config.ema) if config.ema is not None else None
    step, window = 0, [0.0, 0]

    checkpoint = load_checkpoint(run) if resume else None
    if checkpoint is None and run.exists(CHECKPOINT) and not resume:
        raise TrainingError(f"{run.path} already holds a checkpoint; pass resume=True or a new run_dir")
    if checkpoint is not None:
        _check_resume(checkpoint.meta, config, model)
        model.load_state_dict(checkpoint.group("model"))
        restore_optimizer(opt, checkpoint.group("optim"), checkpoint.meta["optimizer"])
        generator.set_state(checkpoint.tensors["rng.generator"].cpu())
        if ema is not None:
            ema.state = {k: v.to(dev) for k, v in checkpoint.group("ema").items()}
        step, window = checkpoint.step, list(checkpoint.meta.get("loss_window", [0.0, 0]))
        _truncate_metrics(run, step)
    elif run.exists("metrics.jsonl"):
        _truncate_metrics(run, 0)      # a start killed before its first checkpoint: it starts again from step 0

    def meta() -> dict[str, Any]:
        return {"model": model.config, "training": asdict(config), "data": spec, "loss_window": window,
                "epoch": step // per_epoch}

    perm_epoch, perm = -1, None
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {model.config.get('name')}",
               dynamic_ncols=True)
    last_loss = float("nan")
    with DeferredInterrupt() as stop:
        while step < total:
            epoch, k = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, epoch_permutation(n, config.seed, epoch).to(dev)
            index = perm[k * config.batch_size:(k + 1) * config.batch_size]
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, step)
            loss = loss_fn(model, images[index], None if labels is None else labels[index], config,
                            model.schedule, generator)
            if not torch.isfinite(loss):
                # stop before the step writes non-finite weights: the checkpoints on disk stay usable
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1} (learning rate "
                                    f"{learning_rate(config, step):.3g}): training diverged; nothing non-finite was "
                                    f"saved. Lower the learning rate (--lr) or clip gradients (--grad-clip)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(model)
            step += 1
            last_loss = loss.item()
            window = [window[0] + last_loss, window[1] + 1]
            if step % log_every == 0 or step == total:
                run.log_metrics(step=step, epoch=step / per_epoch, loss=window[0] / window[1],
                                lr=learning_rate(config, step - 1))
                tensorboard_log.log(run, step, prefix="train/", loss=window[0] / window[1],
                                    lr=learning_rate(config, step - 1))
                bar.set_postfix(loss=f"{window[0] / window[1]:.4f}")
                window = [0.0, 0]
            if step % checkpoint_every == 0 or step == total:
                save_checkpoint(run, step, model, opt, generator, None if ema is None else ema.state, meta())
            bar.update(1)
            if callback is not None:
                callback(step, last_loss)
            if stop.requested:              # Ctrl-C: keep every finished step, then stop
                save_checkpoint(run, step, model, opt, generator, None if ema is None else ema.state, meta())
                raise KeyboardInterrupt
    bar.close()
    return _finish(run, model, ema, step, dev)


def _finish(run: RunDir, model: NetDenoiser, ema: EMA | None, step: int, dev: torch.device) -> TrainResult:
    losses = [m for m in run.read_metrics() if "loss" in m]
    final = losses[-1]["loss"] if losses else float("nan")
    weights = ema.state if ema is not None else None
    save_model(run, model, weights, {"step": step, "final_loss": final,
                                     "weights": "ema" if ema is not None else "raw"})
    if weights is not None:
        model.load_state_dict(weights)
    # back to the standard layout, so the returned net computes exactly what the loaded one does
    model.to(memory_format=torch.contiguous_format)
    if losses:
        plot_loss(run, losses)
    return TrainResult(run=run, model=model.eval(), steps=step, final_loss=final, losses=losses)
