"""`scorefield train` (train a ResNet / UNet / ConvNet denoiser into a run directory) and `scorefield load`
(summary and a quick denoising check of a trained run)."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from ._args import add_data_arguments, data_options

SIZE_FLAGS = ("width", "depth", "emb_dim", "channels", "groups")
TRAINING_FLAGS = ("epochs", "steps", "batch_size", "lr", "optimizer", "lr_decay", "grad_clip", "time_sampling",
                  "ema", "label_dropout", "weight_decay")
CHECK_ALPHA_BARS = (0.05, 0.25, 0.5, 0.75, 0.95)


def register(sub: argparse._SubParsersAction) -> None:
    from ..forward.presets import PROCESSES
    from ..models.nets import ARCHITECTURES, PRESETS
    from ..training import OPTIMIZERS, RECIPES, TIME_SAMPLINGS

    p = sub.add_parser("train", help="train a convolutional denoiser (denoising score matching)",
                       description="Train a ResNet / UNet / ConvNet denoiser by ε-prediction score matching "
                                   "(kamb-ganguli eq. 27) into a run directory; resumes with --resume RUN.")
    p.add_argument("--arch", default="resnet", choices=list(ARCHITECTURES), help="architecture (default resnet)")
    p.add_argument("--preset", default="small", choices=sorted({k for v in PRESETS.values() for k in v}),
                   help="network size: paper | small | tiny (default small)")
    p.add_argument("--padding", default="zeros", choices=["zeros", "circular"])
    p.add_argument("--conditional", action="store_true", help="class-conditional (with label dropout)")
    p.add_argument("--schedule", default=None, help="noise schedule (default: the recipe's, else cosine)")
    p.add_argument("--width", type=int, default=None, help="override the preset's channel width")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    p.add_argument("--emb-dim", type=int, default=None, help="override the embedding dimension")
    p.add_argument("--channels", default=None, help="UNet channels per scale, e.g. 32,64,128")
    p.add_argument("--groups", type=int, default=None, help="GroupNorm groups (unet-small)")
    add_data_arguments(p, default="mnist")
    t = p.add_argument_group("training (defaults from --recipe)")
    t.add_argument("--recipe", default="kamb-ganguli", choices=list(RECIPES),
                   help="training recipe: kamb-ganguli (paper), criticality (ambrogioni F.4), cpu (default "
                        "kamb-ganguli)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS))
    t.add_argument("--lr-decay", type=float, default=None, help="multiplicative learning-rate factor per step")
    t.add_argument("--grad-clip", type=float, default=None)
    t.add_argument("--time-sampling", default=None, choices=list(TIME_SAMPLINGS))
    t.add_argument("--ema", type=float, default=None, help="EMA decay of the saved weights, e.g. 0.999")
    t.add_argument("--label-dropout", type=float, default=None, help="null-class probability (conditional)")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and noise")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    t.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = p.add_argument_group("forward process (component-wise processes of the RG slides; default: standard)")
    f.add_argument("--process", default=None, choices=list(PROCESSES),
                   help="train under this forward process: component (choose with --process-opt basis=, schedule=, "
                        "colour=), standard, matched, rg-cutoff, matched-rg, scale-by-scale, "
                        "matched-scale-by-scale, wavelet (Guth et al.), heat-dissipation, blurring")
    f.add_argument("--process-opt", action="append", metavar="KEY=VALUE",
                   help="process option, e.g. --process-opt basis=pca --process-opt spread=12")
    f.add_argument("--free-theory", action="store_true",
                   help="score = Gaussian free-theory part (analytic) + the network's correction")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs", help="parent folder of the run directory (default runs)")
    o.add_argument("--name", default=None, help="run directory name (default train-<time>)")
    o.add_argument("--resume", default=None, metavar="RUN",
                   help="continue RUN from its last checkpoint (its saved options; --epochs/--steps extend it)")
    o.add_argument("--samples", type=int, default=0, help="draw this many samples at the end (samples.png)")
    o.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of those samples (default 20)")
    p.set_defaults(func=run_train)

    q = sub.add_parser("load", help="summary and a denoising check of a trained run",
                       description="Load a training run's denoiser; print its summary and the denoising MSE "
                                   "at a few ᾱ on held-out images of its dataset (a run trained under a component "
                                   "process is checked under that process, noised as it noises).")
    q.add_argument("run", metavar="RUN", help="training run directory")
    q.add_argument("--n", type=int, default=64, help="held-out images for the check (default 64)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=run_load)


# ---- train -----------------------------------------------------------------------------------------------

def _size_overrides(args: argparse.Namespace) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for key in SIZE_FLAGS:
        value = getattr(args, key, None)
        if value is None:
            continue
        sizes[key] = [int(c) for c in str(value).split(",")] if key == "channels" else value
    return sizes


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    from ..training import recipe

    options = recipe(args.recipe)
    options.pop("schedule", None)
    for key in TRAINING_FLAGS:
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.steps is not None and args.epochs is None:
        options["epochs"] = None
    return options


def run_train(args: argparse.Namespace) -> int:
    if args.samples < 0 or args.sample_steps < 1:   # refused before training, not after it
        raise ValueError(f"--samples must be ≥ 0 and --sample-steps ≥ 1, got {args.samples} and {args.sample_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        result = _resume(args)
    else:
        result = _new_run(args)
    print(f"trained {result.steps} steps, final loss {result.final_loss:.5f}")
    if args.samples:
        path = draw_samples(result.run, result.model, args.samples, args.sample_steps, args.seed)
        print(f"samples: {path}")
    print(f"run directory: {result.run_dir}")
    return 0


def _new_run(args: argparse.Namespace):
    import scorefield as sf

    from ..training import recipe, train

    spec = {"name": args.data, **data_options(args)}
    data = sf.data.load(**spec)
    schedule = args.schedule or recipe(args.recipe).get("schedule", "cosine")
    torch.manual_seed(args.seed)
    model = sf.models.make(args.arch, data, preset=args.preset, padding=args.padding,
                           conditional=args.conditional, schedule=schedule, **_size_overrides(args))
    print(f"{args.arch} ({args.preset}): {model.num_parameters():,} parameters; data {data.name} "
          f"{tuple(data.images.shape)}")
    process = _process(args, data)
    return train(model, data, out=args.out, name=args.name, seed=args.seed, device=args.device,
                 checkpoint_every=args.checkpoint_every, progress=not args.no_progress, data_spec=spec,
                 process=process, **_training_options(args))


def _process(args: argparse.Namespace, data):
    """The forward process of --process / --process-opt / --free-theory (None: the standard one)."""
    import scorefield as sf

    from ._args import parse_key_values

    options = parse_key_values(args.process_opt, "--process-opt")
    if args.process is None:
        if options or args.free_theory:
            raise ValueError("--process-opt and --free-theory need --process NAME")
        return None
    process = sf.forward.make(args.process, data, **options)
    if args.free_theory:
        process = process.parametrized(free_theory=True)
    print(f"forward process: {process.spec()}")
    return process


def _resume(args: argparse.Namespace):
    import scorefield as sf

    from ..checkpoints import load_checkpoint
    from ..models.nets import net_from_config
    from ..runs import RunDir
    from ..training import train

    run = RunDir.open(args.resume)
    saved = load_checkpoint(run)
    meta = saved.meta if saved is not None else run.config
    if not meta.get("data", {}).get("name"):
        raise ValueError(f"{run.path} was trained on in-memory data, not a named dataset: resume it from Python "
                         f"with sf.training.train(model, data, run_dir=...)")
    differ = resume_differences(args, meta)
    if differ:
        raise ValueError(f"cannot resume {run.path} with different options: {'; '.join(differ)} (only --epochs "
                         "and --steps may change when resuming; start a new run for the others)")
    data = sf.data.load(**meta["data"])
    model = net_from_config(meta["model"])
    options = dict(meta["training"])
    options.pop("schedule", None)
    for key in ("epochs", "steps"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.steps is not None and args.epochs is None:
        options["epochs"] = None
    print(f"resuming {run.path} from step {0 if saved is None else saved.step}")
    return train(model, data, run_dir=run, device=args.device, checkpoint_every=args.checkpoint_every,
                 progress=not args.no_progress, data_spec=meta["data"], **options)


def resume_differences(args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
    """'--flag saved → given' for every option given on the command line that differs from the saved run
    (options left at their defaults are not requests to change anything)."""
    saved_training, saved_model = meta.get("training", {}), meta.get("model", {})
    given = {key: getattr(args, key) for key in TRAINING_FLAGS
             if key not in ("epochs", "steps") and getattr(args, key) is not None}
    if args.seed != 0:
        given["seed"] = args.seed
    out = [f"--{k.replace('_', '-')} {saved_training.get(k)!r} → {v!r}" for k, v in given.items()
           if saved_training.get(k) != v]
    model_given = {"name": args.arch if args.arch != "resnet" else None,
                   "preset": args.preset if args.preset != "small" else None,
                   "padding": args.padding if args.padding != "zeros" else None,
                   "conditional": True if args.conditional else None, **_size_overrides(args)}
    out += [f"--{'arch' if k == 'name' else k.replace('_', '-')} {saved_model.get(k)!r} → {v!r}"
            for k, v in model_given.items() if v is not None and saved_model.get(k) != v]
    saved_process = saved_training.get("process") or {}
    if (args.process is not None or args.process_opt or args.free_theory) and (
            args.process != saved_process.get("name")):
        out.append(f"--process {saved_process.get('name')!r} → {args.process!r} (the saved process is rebuilt "
                   "from the run's config)")
    saved_data = meta.get("data", {})
    if args.data != "mnist" and args.data != saved_data.get("name"):
        out.append(f"--data {saved_data.get('name')!r} → {args.data!r}")
    if args.subset is not None and args.subset != saved_data.get("subset"):
        out.append(f"--subset {saved_data.get('subset')!r} → {args.subset!r}")
    return out


def draw_samples(run, model, count: int, steps: int, seed: int):
    """Sample `count` images with 20-step (by default) DDIM; save samples.npz and samples.png in the run."""
    from ..plotting import select_backend

    select_backend()
    import matplotlib.pyplot as plt

    import scorefield as sf

    from ..data.grid import image_grid

    if count < 1 or steps < 1:
        raise ValueError(f"--samples and --sample-steps must be positive, got {count} and {steps}")
    model = model.to("cpu").eval()
    seeds = list(range(seed, seed + count))
    noise = sf.sampling.initial_noise(count, model.image_shape, seeds=seeds)
    labels = torch.arange(count) % model.num_classes if model.conditional else None
    process = getattr(model, "process", None)                        # trained under a component process
    samples = sf.sampling.sample(model, noise, steps=steps, sampler="ddim", schedule=model.schedule.name,
                                 labels=labels, seeds=seeds, process=process)
    run.save_arrays("samples", replace=True, samples=samples, noise=noise, seeds=torch.tensor(seeds))
    grid = image_grid(samples, columns=min(8, count))
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 28 * 0.8, grid.shape[0] / 28 * 0.8))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    return run.save_figure("samples", fig, replace=True)


# ---- load ------------------------------------------------------------------------------------------------

def denoising_check(model, images: torch.Tensor, alpha_bars=CHECK_ALPHA_BARS, seed: int = 0) -> list[dict]:
    """MSE of x̂₀ against x₀ at each ᾱ on `images` [N, C, H, W], next to the data-mean predictor's MSE."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ab in alpha_bars:
        eps = torch.randn(images.shape, generator=g)
        x = ab ** 0.5 * images + (1 - ab) ** 0.5 * eps
        with torch.no_grad():
            x0_hat = model(x, torch.full((len(images),), ab))
        rows.append({"alpha_bar": ab, "mse": float((x0_hat - images).pow(2).mean()),
                     "mse_noisy_input": float((x / ab ** 0.5 - images).pow(2).mean()),
                     "mse_mean_image": float((images.mean(0, keepdim=True) - images).pow(2).mean())})
    return rows


def run_load(args: argparse.Namespace) -> int:
    import json

    import scorefield as sf

    from ..runs import RunDir, markdown_table

    model = sf.models.load(args.run)
    print(json.dumps(model.summary(), indent=2))
    run = RunDir.open(args.run)
    spec = dict(run.config.get("data", {}))
    if not spec.get("name"):
        print("(no dataset recorded in the run: skipping the denoising check)")
        return 0
    held_out = _held_out(spec, args.n, args.seed)
    if (run.config.get("training") or {}).get("process"):             # trained under a component process
        process, net = sf.forward.load_run(args.run)
        print(markdown_table(sf.forward.denoising_check(process, net, held_out.images, seed=args.seed),
                             title=f"denoising MSE under process '{process.name}' on {len(held_out)} held-out "
                                   f"{held_out.name} images"))
        return 0
    print(markdown_table(denoising_check(model, held_out.images, seed=args.seed),
                         title=f"denoising MSE on {len(held_out)} held-out {held_out.name} images"))
    return 0


def _held_out(spec: dict[str, Any], n: int, seed: int):
    """Images the run did not train on: the test split if the loader has one, else the training split."""
    import scorefield as sf

    from ..data import DataError

    spec = {k: v for k, v in spec.items() if k not in ("subset", "seed", "n")}
    try:
        return sf.data.load(**{**spec, "split": "test"}, subset=n, seed=seed)
    except (DataError, ValueError, TypeError):
        return sf.data.load(**spec, subset=n, seed=seed)
