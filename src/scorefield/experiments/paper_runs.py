"""The convolutional rows of kamb-ganguli Tables 1–2 as one resumable run each (`scorefield paper-run NAME`).

Every row of `PAPER_RUNS` is one trained network of the paper (dataset, ResNet or UNet at the paper's width,
zero or circular padding, class-conditional or not) and the numbers the paper reports for it. `paper_run(name,
root)` reproduces the row in one run directory, stage by stage, each stage in its own sub-folder:

    train/          the network, trained by denoising score matching (eq. 27) with the paper's recipe
                    (App. C.1: 300 epochs, Adam, lr 1e-4, batch 128, lr × 0.999965 per step, no weight decay,
                    cosine schedule; `sf.training.recipe("kamb-ganguli")`) on the loader's full training split,
                    which is also the bank of every machine
    calibrate/      the patch-size schedule P(t) of bbELS (zero padding) or ELS (circular padding), calibrated
                    on the network's own 20-step DDIM trajectories from held-out seeds (App. C.2; candidate sizes
                    3…27, 32 seeds starting at `CAL_SEED_START`)
    predict-150/    IS, LS and bbELS/ELS (20 DDIM steps) against the network sampled with 150 DDIM steps from the
                    same 100 seeds (Table 1)
    predict-20/     the same with the network sampled with 20 steps (Table 2)
    paper_comparison.csv / .md   per table and theory: our median r², our median Pearson r, our fraction of
                    samples beating IS, and the paper's number beside them
    stages.json     which stages are finished (and their headline numbers)

The full configurations are meant for a GPU: `device="cuda"` (the default when torch sees one) trains the
network, calibrates and predicts there (a paper-width network over 300 epochs of CIFAR-10 is days of CPU time;
the machines follow the network's trajectories onto the device). Small overrides (`subset`, `steps`,
`batch_size`, `width` / `channels`, `seeds`, `cal_seeds`, `sizes`, `sampler_steps`) make a run fit a CPU;
they are recorded in the run's config.json, and a resume with different ones is refused. MNIST and
FashionMNIST are padded to 32×32 (App. C.1 speaks of "the 32 × 32 images we consider"); CelebA is any
folder of face images, centre-cropped and resized to 32×32.

An interrupted run continues with `resume=run_dir`: finished stages are kept, and the unfinished one resumes
where it stopped (training from its last checkpoint, calibration from its last finished step, prediction from
its last finished denoiser). A resume of a finished run redoes nothing.

The paper's column "Corr." is the Pearson correlation r between theory and network images (its caption speaks
of pixelwise r²); we report both our median r² (the coefficient of determination) and our median Pearson r.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs import RunDir, RunError, markdown_table
from .calibration import CAL_SEED_START

PAPER = "kamb-ganguli (Kamb & Ganguli, An analytic theory of creativity in convolutional diffusion models)"
RECIPE = "kamb-ganguli"
NETWORK_STEPS = {"table1": 150, "table2": 20}      # the network's DDIM steps of each table; theories always 20
TABLE_TITLES = {"table1": "Table 1 (network 150 steps, theories 20)",
                "table2": "Table 2 (network 20 steps, theories 20)"}
OVERRIDES = ("subset", "steps", "batch_size", "width", "channels", "seeds", "cal_seeds", "sizes", "sampler_steps")
DEFAULTS = {"seeds": 100, "cal_seeds": 32, "sizes": list(range(3, 28, 2)), "sampler_steps": 20}


class PaperRunError(ValueError):
    """A paper run asked for with invalid options, or a resume that does not match its run."""


@dataclass(frozen=True)
class PaperRow:
    """One convolutional row of kamb-ganguli Tables 1–2 and how to rebuild it."""

    dataset: str                       # the data registry's name
    arch: str                          # "resnet" | "unet" (preset "paper")
    padding: str                       # "zeros" | "circular"
    conditional: bool
    machine: str                       # the equivariant machine: "bbels" (zeros) | "els" (circular)
    # the paper's numbers per table: "els", "ls", "is" (Corr. = Pearson r) and "beats_is" ((E)LS > IS, a fraction)
    table1: dict[str, float]
    table2: dict[str, float]
    data_options: dict[str, Any] = field(default_factory=dict)
    needs_root: bool = True
    beats_is_theory: str = ""          # which theory the paper's "(E)LS > IS" counts ("" = the machine)

    @property
    def headline(self) -> str:
        return self.beats_is_theory or self.machine


def _row(dataset: str, arch: str, padding: str, conditional: bool, t1: tuple[float, ...], t2: tuple[float, ...],
         **extra: Any) -> PaperRow:
    keys = ("els", "ls", "is", "beats_is")
    return PaperRow(dataset=dataset, arch=arch, padding=padding, conditional=conditional,
                    machine="bbels" if padding == "zeros" else "els", table1=dict(zip(keys, t1, strict=True)),
                    table2=dict(zip(keys, t2, strict=True)), **extra)


# MNIST and FashionMNIST are padded to 32×32 (App. C.1: "the 32 × 32 images we consider"); CelebA is a folder of
# images, centre-cropped and resized to 32×32. Numbers: (ELS Corr., LS Corr., IS Corr., (E)LS > IS).
_PAD32 = {"pad_to": 32}
PAPER_RUNS: dict[str, PaperRow] = {
    "mnist-resnet-zeros": _row("mnist", "resnet", "zeros", False, (0.94, 0.82, 0.61, 1.00), (0.94, 0.84, 0.62, 0.97),
                               data_options=_PAD32, needs_root=False),
    "mnist-resnet-circular": _row("mnist", "resnet", "circular", False, (0.77, 0.36, 0.15, 0.92),
                                  (0.73, 0.33, 0.14, 0.99), data_options=_PAD32, needs_root=False),
    "mnist-unet-zeros": _row("mnist", "unet", "zeros", False, (0.89, 0.88, 0.70, 0.93), (0.84, 0.83, 0.69, 0.92),
                             data_options=_PAD32, needs_root=False),
    "fashion-mnist-resnet-zeros": _row("fashion-mnist", "resnet", "zeros", True, (0.94, 0.88, 0.68, 1.00),
                                       (0.90, 0.88, 0.74, 0.97), data_options=_PAD32),
    "fashion-mnist-unet-zeros": _row("fashion-mnist", "unet", "zeros", True, (0.93, 0.93, 0.80, 1.00),
                                     (0.91, 0.91, 0.80, 0.90), data_options=_PAD32),
    "cifar10-resnet-zeros": _row("cifar10", "resnet", "zeros", True, (0.95, 0.90, 0.42, 1.00),
                                 (0.90, 0.86, 0.43, 1.00)),
    "cifar10-resnet-circular": _row("cifar10", "resnet", "circular", True, (0.94, 0.83, 0.35, 1.00),
                                    (0.90, 0.80, 0.36, 1.00)),
    "cifar10-unet-zeros": _row("cifar10", "unet", "zeros", True, (0.90, 0.87, 0.41, 0.92), (0.82, 0.80, 0.39, 0.99)),
    "celeba-resnet-zeros": _row("folder", "resnet", "zeros", False, (0.96, 0.90, 0.47, 1.00),
                                (0.92, 0.88, 0.48, 1.00), data_options={"size": 32}),
    # the one row where the paper finds LS the better theory, and counts LS > IS
    "celeba-unet-zeros": _row("folder", "unet", "zeros", False, (0.85, 0.90, 0.55, 1.00), (0.75, 0.81, 0.51, 1.00),
                              data_options={"size": 32}, beats_is_theory="ls"),
}


def get_row(name: str) -> PaperRow:
    if name not in PAPER_RUNS:
        from ..options import closest

        raise PaperRunError(f"unknown paper run '{name}'{closest(str(name), PAPER_RUNS)}; available: "
                            f"{', '.join(PAPER_RUNS)}")
    return PAPER_RUNS[name]


def paper_command(name: str) -> str:
    """The command that reproduces row `name` on a GPU."""
    row = get_row(name)
    root = {"fashion-mnist": " --root DIR_OF_FASHION_MNIST_IDX", "cifar10": " --root DIR_OF_CIFAR10_BATCHES",
            "folder": " --root DIR_OF_CELEBA_IMAGES"}.get(row.dataset, "")
    return f"scorefield paper-run {name}{root} --device cuda"


def list_rows() -> list[dict[str, Any]]:
    """One row per paper run: its setup, the paper's numbers of both tables and the command."""
    out = []
    for name, row in PAPER_RUNS.items():
        r: dict[str, Any] = {"name": name, "dataset": row.dataset, "arch": row.arch, "padding": row.padding,
                             "conditional": "yes" if row.conditional else "no", "machine": row.machine}
        for table in ("table1", "table2"):
            numbers = getattr(row, table)
            tag = "T1" if table == "table1" else "T2"
            r.update({f"{tag} {label}": f"{numbers[key]:.2f}" for key, label in (
                ("els", "ELS"), ("ls", "LS"), ("is", "IS"), ("beats_is", "(E)LS>IS"))})
        r["command"] = f"`{paper_command(name)}`"
        out.append(r)
    return out


# ---- the setup of a row -------------------------------------------------------------------------------------

def _check_overrides(row: PaperRow, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides as plain JSON values, refusing unknown keys and bad values with the argument's name."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise PaperRunError(f"unknown override(s) {', '.join(unknown)}; available: {', '.join(OVERRIDES)}")
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "sizes":
            sizes = sorted({int(v) for v in value})
            if not sizes or any(v < 1 or v % 2 == 0 for v in sizes):
                raise PaperRunError(f"sizes must be odd positive patch sizes, got {list(value)}")
            out[key] = sizes
        elif key == "channels":
            channels = [int(v) for v in value]
            if row.arch != "unet" or len(channels) != 3 or min(channels) < 1:
                raise PaperRunError(f"channels (three positive ints) applies to the UNet rows, got {value!r} for "
                                    f"a {row.arch}; use width")
            out[key] = channels
        else:
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise PaperRunError(f"{key} must be a positive integer, got {value!r}")
            out[key] = int(value)
    if "width" in out and "channels" in out:
        raise PaperRunError("give width or channels, not both")
    return out


def network_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The full network config of row `name` (preset 'paper', its padding and conditioning) with size overrides:
    width for the ResNet; channels [c, 2c, 4c] (or width c) for the UNet. Builds nothing."""
    from ..models.nets import resolve_options

    row = get_row(name)
    o = _check_overrides(row, overrides)
    sizes: dict[str, Any] = {}
    if row.arch == "resnet" and "width" in o:
        sizes["width"] = o["width"]
    elif row.arch == "unet" and ("width" in o or "channels" in o):
        sizes["channels"] = o.get("channels") or [o["width"], 2 * o["width"], 4 * o["width"]]
    return {"arch": row.arch, **resolve_options(row.arch, preset="paper", padding=row.padding,
                                                conditional=row.conditional, **sizes)}


def training_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The `sf.training.train` options of row `name`: the kamb-ganguli recipe (300 epochs) with `steps` (instead
    of epochs) and `batch_size` overrides."""
    from ..training import recipe

    o = _check_overrides(get_row(name), overrides)
    options = recipe(RECIPE)
    if "steps" in o:
        options["steps"] = o["steps"]
    if "batch_size" in o:
        options["batch_size"] = o["batch_size"]
    return options


def data_spec(name: str, root: str | Path | None, subset: int | None = None) -> dict[str, Any]:
    """How to load row `name`'s training split (also the machines' bank): keyword arguments of `sf.data.load`."""
    row = get_row(name)
    spec: dict[str, Any] = {"name": row.dataset, "split": "train", **row.data_options}
    if row.needs_root:
        if root is None:
            raise PaperRunError(f"{name} reads your {row.dataset} files: give root (--root DIR)")
        folder = Path(root).expanduser().resolve()
        if not folder.is_dir():
            raise PaperRunError(f"root folder not found: {folder}")
        spec["root"] = str(folder)
    elif root is not None:
        raise PaperRunError(f"{name} uses the {row.dataset} set that ships with the toolkit; root is not used")
    if subset is not None:
        spec.update(subset=int(subset), seed=0)
    return spec


# ---- the run -----------------------------------------------------------------------------------------------

@dataclass
class PaperRunResult:
    name: str
    run_dir: Path
    table: list[dict[str, Any]]       # the rows of paper_comparison.csv
    patch_sizes: list[int]            # the calibrated schedule, lowest noise first
    stages: dict[str, Any]            # stages.json

    def markdown(self) -> str:
        return (self.run_dir / "paper_comparison.md").read_text()


def paper_run(name: str, root: str | Path | None = None, *, out: str | Path = "runs", resume: str | Path | None = None,
              device: str | None = None, progress: bool = True, run_name: str | None = None,
              **overrides: Any) -> PaperRunResult:
    """Train, calibrate and predict the paper's row `name` (module docstring) in one run directory.

    root: the folder of the dataset's files (FashionMNIST IDX, CIFAR-10 python batches, or a folder of CelebA
    images; not for MNIST, which ships with the toolkit); out / run_name: where the run directory goes; resume: an
    interrupted (or finished) paper run to continue (name, root and overrides default to its saved ones; ones
    given must agree); device: where the network trains, calibrates and predicts (default cuda if available);
    overrides: subset (training images), steps (training steps instead of 300 epochs), batch_size, width /
    channels (network size), seeds (predicted samples, default 100), cal_seeds (default 32), sizes (candidate
    patch sizes, default 3…27), sampler_steps (the theories' and calibration's DDIM steps, default 20).
    """
    from ..training import pick_device
    from .networks import check_device

    where = check_device(pick_device(device))            # refused before any run directory exists
    run, config, data = _open(name, root, out, resume, run_name, overrides)
    try:
        return _stages(run, config, data, where, progress)
    finally:
        run.release()


def _config(name: str, root: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    row = get_row(name)
    o = _check_overrides(row, overrides)
    return {"paper_run": name, "paper": PAPER, "dataset": row.dataset, "arch": row.arch, "padding": row.padding,
            "conditional": row.conditional, "machine": row.machine, "recipe": RECIPE,
            "data": data_spec(name, root, o.get("subset")), "network": network_options(name, **o),
            "training": training_options(name, **o), "overrides": o,
            **{k: o.get(k, v) for k, v in DEFAULTS.items()}, "network_steps": NETWORK_STEPS,
            "paper_numbers": {"table1": row.table1, "table2": row.table2}}


def _open(name: str | None, root: str | Path | None, out: str | Path, resume: str | Path | None,
          run_name: str | None, overrides: dict[str, Any]) -> tuple[RunDir, dict[str, Any], Any]:
    """(the paper run's directory, created or reopened after checking its options and locked; its config; the
    training data of a new run, loaded before its directory exists so that bad files leave nothing behind)."""
    if resume is None:
        import scorefield as sf

        if name is None:
            raise PaperRunError(f"give a paper run name; available: {', '.join(PAPER_RUNS)}")
        config = _config(name, root, overrides)
        data = sf.data.load(**config["data"])
        return RunDir.create("paper-run", config, root=out, name=run_name).lock(), config, data
    run = RunDir.open(resume)
    saved = run.config
    if saved.get("kind") != "paper-run":
        raise PaperRunError(f"cannot resume {run.path} as a paper run: it is a '{saved.get('kind')}' run")
    name = name or saved["paper_run"]
    if name != saved["paper_run"]:
        raise PaperRunError(f"cannot resume {run.path}: it is the paper run '{saved['paper_run']}', not '{name}'")
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**saved.get("overrides", {}), **given}
    saved_root = saved["data"].get("root")
    config = _config(name, root if root is not None else saved_root, merged)
    differ = [k for k in ("overrides", "data") if json.loads(json.dumps(config[k])) != saved.get(k)]
    if differ:
        listed = "; ".join(f"{k} {saved.get(k)!r} → {config[k]!r}" for k in differ)
        raise PaperRunError(f"cannot resume {run.path}: options differ from the saved run ({listed})")
    return run.lock(), config, None


def _stages(run: RunDir, config: dict[str, Any], data: Any, device: Any, progress: bool) -> PaperRunResult:
    stages = run.read_json("stages.json") if run.exists("stages.json") else {}
    if "compare" in stages:                                    # finished: read it back, write nothing
        return _result(run, config, stages)
    import scorefield as sf

    spec = dict(config["data"])
    data = sf.data.load(**spec) if data is None else data
    network = _train(run, config, data, spec, device, progress, stages)
    cal = _calibrate(run, config, network, data, spec, device, progress, stages)
    tables = {table: _predict(run, config, network, data, spec, cal, table, device, progress, stages)
              for table in NETWORK_STEPS}
    rows = comparison_rows(config, tables)
    run.save_table("paper_comparison", rows, replace=True, title=_title(config))
    _done(run, stages, "compare", {"rows": len(rows)})
    return _result(run, config, stages)


def _done(run: RunDir, stages: dict[str, Any], stage: str, info: dict[str, Any]) -> None:
    stages[stage] = info
    run.write_json("stages.json", stages, replace=True)


def _fresh(run: RunDir, sub: str) -> Path | None:
    """The stage folder to resume (it holds a config.json), or None to create it; a folder left by a process
    killed while creating it (no config.json yet) is cleared first."""
    from ..training import _clear_unfinished_creation

    path = run.path / sub
    if (path / "config.json").is_file():
        return path
    _clear_unfinished_creation(path)
    return None


def _train(run: RunDir, config: dict[str, Any], data: Any, spec: dict[str, Any], device: Any,
           progress: bool, stages: dict[str, Any]) -> Any:
    """The trained network (returned on the CPU; calibration and prediction move it to their device): train/
    read back when finished, else trained (or resumed from its last checkpoint) there."""
    import torch

    import scorefield as sf

    folder = run.path / "train"
    if "train" in stages or (folder / "model.safetensors").is_file():      # written when training finishes
        stages.setdefault("train", {"images": len(data)})
        return sf.models.load(folder)
    options = dict(config["network"])
    arch = options.pop("arch")
    torch.manual_seed(0)
    model = sf.models.make(arch, data, **options)
    tic = time.perf_counter()
    result = sf.training.train(model, data, run_dir=folder, seed=0, progress=progress, device=device,
                               data_spec=spec, **config["training"])
    _done(run, stages, "train", {"steps": result.steps, "final_loss": result.final_loss,
                                 "seconds": round(time.perf_counter() - tic, 1), "images": len(data)})
    return result.model.to("cpu").eval()


def _calibrate(run: RunDir, config: dict[str, Any], network: Any, data: Any, spec: dict[str, Any], device: Any,
               progress: bool, stages: dict[str, Any]) -> Any:
    from .calibration import Calibration, calibrate

    folder = run.path / "calibrate"
    if "calibrate" in stages or (folder / "summary.json").is_file():        # written when it finishes
        cal = Calibration.load(folder)
        stages.setdefault("calibrate", {"patch_sizes": cal.patch_sizes})
        return cal
    seeds = range(CAL_SEED_START, CAL_SEED_START + config["cal_seeds"])
    tic = time.perf_counter()
    cal = calibrate(network, data, machine=config["machine"], patch_sizes=config["sizes"], seeds=seeds,
                    steps=config["sampler_steps"], out=run.path, name="calibrate", resume=_fresh(run, "calibrate"),
                    progress=progress, network_spec={"run": str(run.path / "train")}, data_spec=spec,
                    device=device)
    _done(run, stages, "calibrate", {"patch_sizes": cal.patch_sizes, "seconds": round(time.perf_counter() - tic, 1)})
    return cal


def _predict(run: RunDir, config: dict[str, Any], network: Any, data: Any, spec: dict[str, Any], cal: Any,
             table: str, device: Any, progress: bool, stages: dict[str, Any]) -> list[dict[str, Any]]:
    """The agreement table of one paper table: the network sampled with NETWORK_STEPS[table] steps, the
    theories with sampler_steps."""
    from .prediction import predict

    steps = NETWORK_STEPS[table]
    sub = f"predict-{steps}"
    stage = f"predict-{table}"
    if stage not in stages and not (run.path / sub / "summary.json").is_file():   # written when it finishes
        tic = time.perf_counter()
        predict(network, data, theories=["is", "ls", config["machine"]], schedule_from=cal,
                seeds=range(config["seeds"]), steps=config["sampler_steps"], network_steps=steps, out=run.path,
                name=sub, resume=_fresh(run, sub), progress=progress, network_spec={"run": str(run.path / "train")},
                data_spec=spec, calibration_run=str(run.path / "calibrate"), device=device)
        _done(run, stages, stage, {"folder": sub, "seconds": round(time.perf_counter() - tic, 1)})
    stages.setdefault(stage, {"folder": sub})
    return read_csv(run.path / sub / "agreement.csv")


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A table written by `RunDir.save_table`, numbers as floats."""
    rows = []
    for r in csv.DictReader(io.StringIO(path.read_text())):
        rows.append({k: _number(v) for k, v in r.items()})
    return rows


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


PAPER_COLUMN = {"is": "is", "ls": "ls", "els": "els", "bbels": "els"}


def comparison_rows(config: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per table and theory: our median r², median Pearson r and fraction beating IS, and the paper's Corr.
    (Pearson r) and "(E)LS > IS" fraction (given for the theory the paper counts it for)."""
    row = get_row(config["paper_run"])
    out = []
    for table, agreement in tables.items():
        paper = config["paper_numbers"][table]
        for a in agreement:
            theory = str(a["theory"])
            beats = a.get("fraction_beats_is", "")
            out.append({"table": TABLE_TITLES[table], "theory": theory, "n": int(a["n"]),
                        "r2_median": a["r2_median"], "pearson_median": a["pearson_median"],
                        "paper_corr": paper[PAPER_COLUMN[theory]],
                        "fraction_beats_is": "" if theory == "is" else beats,
                        "paper_beats_is": paper["beats_is"] if theory == row.headline else ""})
    return out


def _title(config: dict[str, Any]) -> str:
    o = config["overrides"]
    small = f"; overrides {', '.join(f'{k}={v}' for k, v in o.items())}" if o else ""
    return (f"{config['paper_run']}: ours vs kamb-ganguli ({config['arch']}, {config['padding']} padding, "
            f"{'conditional' if config['conditional'] else 'unconditional'}, {config['seeds']} seeds{small}). "
            f"paper_corr is the paper's Corr. (Pearson r), beside our median Pearson r; r² = coefficient of "
            f"determination")


def _result(run: RunDir, config: dict[str, Any], stages: dict[str, Any]) -> PaperRunResult:
    if not run.exists("paper_comparison.csv"):
        raise RunError(f"{run.path}: stages.json says finished but paper_comparison.csv is missing")
    return PaperRunResult(name=config["paper_run"], run_dir=run.path,
                          table=read_csv(run.file("paper_comparison.csv")),
                          patch_sizes=list(stages.get("calibrate", {}).get("patch_sizes", [])), stages=stages)


def format_list() -> str:
    """The --list table (Markdown): every row with the paper's numbers and its command."""
    return markdown_table(list_rows(), title="kamb-ganguli Tables 1 (T1: network 150 steps) and 2 (T2: 20 steps); "
                                             "Corr. = Pearson r; (E)LS>IS = fraction of samples "
                                             "(LS > IS for celeba-unet-zeros, else the machine's)")


__all__ = ["PAPER_RUNS", "PaperRow", "PaperRunError", "PaperRunResult", "comparison_rows", "data_spec",
           "format_list", "list_rows", "network_options", "paper_command", "paper_run", "training_options"]
