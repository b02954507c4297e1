"""`scorefield compare-processes`: standard diffusion vs matched noise vs matched noise + component-wise schedule
(vs heat dissipation and blurring diffusion) on φ⁴ fields and MNIST, same network and budget (RG slides).

Under `torchrun --nproc-per-node N` the (dataset, process, seed) units are dealt to the ranks and rank 0 writes
one run directory; `--shard bank` is refused (a unit is a whole training)."""
from __future__ import annotations

import argparse

from ._args import parse_key_values
from ._distributed import add_shard_argument, refuse_bank, writer

BANK = "a unit is a whole network training, not a patch-posterior machine"


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..experiments.process_comparison import DATASETS, DEFAULT_PROCESSES, PROCESS_CHOICES
    from ..models.nets import ARCHITECTURES

    p = subparsers.add_parser(
        "compare-processes", help="train and compare forward processes (standard, matched, RG cutoff, presets)",
        description="For each dataset and forward process: train the same network for the same budget by "
                    "denoising score matching under the process, sample with its reverse process and measure the "
                    "samples against held-out data (power-spectrum error, sliced Wasserstein; for φ⁴ the "
                    "magnetization and action distributions and the two-point function). Writes comparison.csv/.md, "
                    "the knob effects and figures; with --seeds N, mean ± standard error over N seeds. Processes: "
                    + ", ".join(PROCESS_CHOICES) + " (default: " + ", ".join(DEFAULT_PROCESSES) + ")")
    g = p.add_argument_group("what to compare")
    g.add_argument("--datasets", default="phi4,mnist", help=f"comma-separated among {', '.join(DATASETS)} "
                                                             "(default phi4,mnist)")
    g.add_argument("--processes", default=",".join(DEFAULT_PROCESSES), help="comma-separated process labels")
    g.add_argument("--process-opt", action="append", metavar="LABEL:KEY=VALUE",
                   help="override a process option, e.g. --process-opt matched-rg:spread=12")
    g.add_argument("--phi4-opt", action="append", metavar="KEY=VALUE",
                   help="φ⁴ loader options (default size=6 mass2=-1 coupling=3 z2_flip=true)")
    g.add_argument("--mnist-subset", type=int, default=None, help="MNIST training images (default --n-train)")
    g.add_argument("--n-train", type=int, default=2000, help="training images per dataset (default 2000)")
    g.add_argument("--n-test", type=int, default=1000, help="held-out images per dataset (default 1000)")
    n = p.add_argument_group("the one network and budget")
    n.add_argument("--arch", default="resnet", choices=list(ARCHITECTURES), help="architecture (default resnet)")
    n.add_argument("--preset", default="small", help="network size preset (default small)")
    n.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="size override, e.g. width=16")
    n.add_argument("--steps", type=int, default=1500, help="optimizer steps per process (default 1500)")
    n.add_argument("--batch-size", type=int, default=64)
    n.add_argument("--lr", type=float, default=2e-3)
    n.add_argument("--lr-decay", type=float, default=0.999)
    n.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights sampled with (0: none)")
    s = p.add_argument_group("samples")
    s.add_argument("--n-samples", type=int, default=1000, help="samples per process (default 1000)")
    s.add_argument("--sample-steps", type=int, default=50, help="sampler steps (default 50)")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "heun"])
    s.add_argument("--projections", type=int, default=256, help="sliced-Wasserstein directions (default 256)")
    o = p.add_argument_group("output")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train and sample every process with N seeds (seed, seed+1, …) and report mean ± standard "
                        "error (default 1)")
    o.add_argument("--device", default=None)
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--out", default="runs", help="folder for run directories (default runs/)")
    o.add_argument("--name", default=None, help="run directory name")
    o.add_argument("--resume", default=None, metavar="RUN_DIR", help="finish an interrupted comparison")
    o.add_argument("--no-figures", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    add_shard_argument(p, bank=BANK)
    p.set_defaults(func=run)


def _process_options(items: list[str] | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items or []:
        if ":" not in item:
            raise ValueError(f"--process-opt expects LABEL:KEY=VALUE, got '{item}'")
        label, rest = item.split(":", 1)
        out.setdefault(label.strip(), {}).update(parse_key_values([rest], "--process-opt"))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..experiments.process_comparison import compare_processes, format_table, summary_text

    refuse_bank(args, BANK)
    if args.threads:
        torch.set_num_threads(args.threads)
    phi4 = {"size": 6, "mass2": -1.0, "coupling": 3.0, "z2_flip": True}
    phi4.update(parse_key_values(args.phi4_opt, "--phi4-opt"))
    run_dir = compare_processes(
        datasets=_names(args.datasets), processes=_names(args.processes), arch=args.arch, preset=args.preset,
        model_options=parse_key_values(args.model_opt, "--model-opt"), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, ema=args.ema or None,
        n_train=args.n_train, n_test=args.n_test, n_samples=args.n_samples, sample_steps=args.sample_steps,
        sampler=args.sampler, phi4_options=phi4, mnist_subset=args.mnist_subset,
        process_options=_process_options(args.process_opt), projections=args.projections, seed=args.seed,
        device=args.device, out=args.out, name=args.name, resume=args.resume, progress=not args.no_progress,
        figures=not args.no_figures, seeds=args.seeds)
    if not writer():
        return 0
    print(format_table(run_dir))
    print(summary_text(run_dir))
    print(f"run directory: {run_dir.path}")
    return 0
