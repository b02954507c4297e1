"""`scorefield paper-run NAME`: one row of kamb-ganguli Tables 1–2 (train → calibrate → predict with 150- and
20-step networks → the paper's numbers beside ours), resumable, in one run directory. `--list` shows the rows."""
from __future__ import annotations

import argparse

from ._network import add_output_arguments, parse_sizes

DESCRIPTION = (
    "Reproduce one convolutional row of kamb-ganguli Tables 1-2 in one run directory, stage by stage: "
    "train/ (the paper's network at preset 'paper' trained with its App. C.1 recipe: 300 epochs, Adam, lr 1e-4, "
    "batch 128, lr x0.999965 per step, cosine schedule, on the loader's full training split, which is also the "
    "machines' bank); calibrate/ (the bbELS or ELS patch size per step on the network's own 20-step DDIM "
    "trajectories from 32 held-out seeds, candidate sizes 3..27, App. C.2); predict-150/ and predict-20/ (IS, LS "
    "and bbELS/ELS with 20 DDIM steps against the network with 150 steps (Table 1) and 20 steps (Table 2), 100 "
    "seeds); paper_comparison.csv/.md (our median r2, median Pearson r and fraction beating IS beside the paper's "
    "Corr. (Pearson r) and (E)LS > IS). MNIST and FashionMNIST are padded to 32x32, CelebA images centre-cropped "
    "and resized to 32x32. The full configurations are meant for a GPU (--device cuda); the "
    "overrides (--subset, --train-steps, --batch-size, --width, --seeds, --cal-seeds, --sizes) make a small run "
    "for a CPU. An interrupted run continues with --resume RUN (finished stages are kept).")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("paper-run", help="one row of kamb-ganguli Tables 1-2, end to end (GPU-sized)",
                              description=DESCRIPTION)
    p.add_argument("paper_run", nargs="?", default=None, metavar="NAME",
                   help="the paper row, e.g. cifar10-resnet-zeros (see --list)")
    p.add_argument("--list", action="store_true", help="list the rows, the paper's numbers and their commands")
    p.add_argument("--root", default=None, help="folder of the dataset's files (FashionMNIST IDX, CIFAR-10 "
                   "python batches, or a folder of CelebA images); not for the bundled MNIST")
    p.add_argument("--device", default=None, help="where the network trains, calibrates and predicts: cpu | "
                   "cuda (default: cuda if available)")
    s = p.add_argument_group("small-run overrides (default: the paper's setup)")
    s.add_argument("--subset", type=int, default=None, help="training images (default: the full training split)")
    s.add_argument("--train-steps", type=int, default=None, help="training steps instead of 300 epochs")
    s.add_argument("--batch-size", type=int, default=None, help="training batch (default 128)")
    s.add_argument("--width", type=int, default=None, help="network width (ResNet width; UNet channels W,2W,4W)")
    s.add_argument("--seeds", type=int, default=None, help="predicted samples, seeds 0..N-1 (default 100)")
    s.add_argument("--cal-seeds", type=int, default=None, help="calibration seeds (default 32)")
    s.add_argument("--sizes", default=None, help="candidate patch sizes, e.g. 3:27 (default) or 3,5")
    s.add_argument("--sampler-steps", type=int, default=None, help="theory and calibration DDIM steps "
                   "(default 20)")
    add_output_arguments(p, resume_help="continue an interrupted paper run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments.paper_runs import format_list, paper_run

    if args.list:
        print(format_list())
        return 0
    if args.paper_run is None and args.resume is None:
        raise ValueError("give a paper run NAME (see scorefield paper-run --list) or --resume RUN")
    result = paper_run(args.paper_run, args.root, out=args.out, resume=args.resume, device=args.device,
                       progress=not args.no_progress, run_name=args.name, subset=args.subset,
                       steps=args.train_steps, batch_size=args.batch_size, width=args.width, seeds=args.seeds,
                       cal_seeds=args.cal_seeds, sizes=None if args.sizes is None else parse_sizes(args.sizes),
                       sampler_steps=args.sampler_steps)
    print(result.markdown())
    if result.patch_sizes:
        print(f"calibrated patch sizes (lowest noise first): {','.join(map(str, result.patch_sizes))}")
    print(f"run directory: {result.run_dir}")
    return 0
