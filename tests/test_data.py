"""Data layer: readers round-trip files written here, bad files give one clear DataError, the bundled and
synthetic sets have the promised form, every shared option works, and the `data` CLI runs."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scorefield as sf
from scorefield.cli import main
from scorefield.data import DataError
from scorefield.data.bundled import NATURAL_IMAGES
from scorefield.data.files import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, read_idx
from scorefield.data.synthetic import gaussian_random_field, make_patch_dictionary, power_law_spectrum

# ---------------------------------------------------------------- helpers that write standard files


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 0x08 ndim, big-endian int32 sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    for kind, array, rank in (("images", images, 3), ("labels", labels, 1)):
        name = f"{prefix}-{kind}-idx{rank}-ubyte"
        data = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)


def write_cifar(root: Path, per_batch: int = 2, meta: bool = True) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh)
        batches[name] = (data, labels)
    if meta:
        with open(root / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072}, fh)
    return batches


# ---------------------------------------------------------------- IDX (MNIST / FashionMNIST)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx_set(tmp_path, "train", train, np.array([0, 1, 2, 9, 9]), gz)
    write_idx_set(tmp_path, "t10k", test, np.array([3, 4, 5]), gz)

    data = sf.data.load("fashion-mnist", root=str(tmp_path))
    assert data.images.shape == (5, 1, 28, 28)
    assert torch.allclose(data.images[:, 0], torch.from_numpy(train).float() / 255 * 2 - 1)
    assert data.labels.tolist() == [0, 1, 2, 9, 9]
    assert data.class_names == FASHION_MNIST_CLASSES
    data_test = sf.data.load("mnist-idx", split="test", root=tmp_path)
    assert data_test.labels.tolist() == [3, 4, 5] and data_test.class_names == [str(i) for i in range(10)]
    assert torch.allclose(data_test.images[:, 0], torch.from_numpy(test).float() / 255 * 2 - 1)


@pytest.mark.parametrize("damage", ["truncate", "magic", "sizes", "gzip"])
def test_idx_malformed_file_names_the_file(tmp_path: Path, damage: str) -> None:
    images = np.zeros((4, 6, 6), dtype=np.uint8)
    write_idx_set(tmp_path, "train", images, np.arange(4), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-7])
    elif damage == "magic":
        path.write_bytes(b"\x12\x34" + raw[2:])
    elif damage == "sizes":  # header says 5 images, the file holds 4
        path.write_bytes(raw[:4] + np.asarray([5, 6, 6], dtype=">i4").tobytes() + raw[16:])
    else:
        path.unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as info:
        sf.data.load("mnist-idx", root=tmp_path)
    assert "IDX" in str(info.value)


def test_idx_missing_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*IDX"):
        sf.data.load("mnist-idx", root=tmp_path)
    write_idx_set(tmp_path, "train", np.zeros((4, 6, 6), dtype=np.uint8), np.arange(3), gz=False)
    with pytest.raises(DataError, match="3 labels for 4 images"):
        sf.data.load("mnist-idx", root=tmp_path)
    with pytest.raises(DataError, match="rank"):
        read_idx(tmp_path / "train-labels-idx1-ubyte", ndim=3)
    with pytest.raises(DataError, match="root="):
        sf.data.load("fashion-mnist")


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_round_trip(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path)
    data = sf.data.load("cifar10", root=tmp_path)
    assert data.images.shape == (10, 3, 32, 32) and data.class_names == CIFAR10_CLASSES
    first, labels = batches["data_batch_1"]
    # rows hold the R, G and B planes of a 32×32 image, one after the other
    expected = torch.from_numpy(first[0].reshape(3, 32, 32)).float() / 255 * 2 - 1
    assert torch.allclose(data.images[0], expected)
    assert data.labels[:2].tolist() == labels
    test = sf.data.load("cifar10", split="test", root=tmp_path)
    assert len(test) == 2 and test.labels.tolist() == batches["test_batch"][1]


def test_cifar_nested_folder_and_default_names(tmp_path: Path) -> None:
    nested = tmp_path / "cifar-10-batches-py"
    nested.mkdir()
    write_cifar(nested, meta=False)
    data = sf.data.load("cifar10", split="test", root=tmp_path)
    assert data.class_names == CIFAR10_CLASSES and len(data) == 2


def test_cifar_malformed_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3.*CIFAR-10 python batch"):
        sf.data.load("cifar10", root=tmp_path)
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataError, match="data_batch_3.*3072"):
        sf.data.load("cifar10", root=tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch: file not found"):
        sf.data.load("cifar10", split="test", root=tmp_path)


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Exploit(), b"labels": []}, fh)
    with pytest.raises(DataError, match="test_batch.*refusing"):
        sf.data.load("cifar10", split="test", root=tmp_path)


# ---------------------------------------------------------------- image folder


def test_image_folder_round_trip(tmp_path: Path) -> None:
    # 30 wide × 10 high: the centre 10×10 square is red, the sides blue, so the centre crop is pure red
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :, 2] = 255
    wide[:, 10:20] = (255, 0, 0)
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    Image.fromarray(np.full((50, 20), 128, dtype=np.uint8)).save(tmp_path / "b_tall_grey.png")
    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(tmp_path / "c_square.jpg")
    (tmp_path / "notes.txt").write_text("not an image")

    data = sf.data.load("folder", root=tmp_path, size=8)
    assert data.images.shape == (3, 3, 8, 8) and data.labels is None
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 8, 8)
    assert torch.allclose(data.images[0], red, atol=0.02)
    assert torch.allclose(data.images[1], torch.full((3, 8, 8), 128 / 255 * 2 - 1), atol=0.02)
    grey = sf.data.load("folder", root=tmp_path, size=8, channels=1, max_images=2)
    assert grey.images.shape == (2, 1, 8, 8)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no image files"):
        sf.data.load("folder", root=tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.png"):
        sf.data.load("folder", root=tmp_path)
    with pytest.raises(DataError, match="folder not found"):
        sf.data.load("folder", root=tmp_path / "missing")


# ---------------------------------------------------------------- bundled sets


def test_mnist_from_package() -> None:
    data = sf.data.load("mnist", split="train", subset=10, seed=0)
    assert data.images.shape == (10, 1, 28, 28) and data.labels.shape == (10,)
    assert data.images.min() == -1.0 and 0.9 < data.images.max() <= 1.0
    assert len(sf.data.load("mnist", split="validation")) == 10_000
    assert len(sf.data.load("mnist", split="test")) == 10_000
    padded = sf.data.load("mnist", split="val", subset=3, pad_to=32)
    assert padded.images.shape == (3, 1, 32, 32)
    assert (padded.images[:, :, :2] == -1).all() and (padded.images[:, :, :, -2:] == -1).all()
    with pytest.raises(DataError, match="split"):
        sf.data.load("mnist", split="dev")


def test_digits() -> None:
    data = sf.data.load("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert data.images.min() == -1.0 and data.images.max() == 1.0


def test_natural_images_ship_with_scikit_image() -> None:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for name in NATURAL_IMAGES:
        assert list(folder.glob(f"{name}.*")), f"{name} is not bundled inside scikit-image"
    data = sf.data.load("natural", n=6, size=16, channels=3, seed=2)
    assert data.images.shape == (6, 3, 16, 16) and data.class_names == list(NATURAL_IMAGES)
    grey = sf.data.load("natural", n=4, size=16, images="camera,moon")
    assert grey.images.shape == (4, 1, 16, 16) and set(grey.labels.tolist()) <= {0, 1}
    assert not torch.equal(sf.data.load("natural", n=4, size=16, seed=3).images, grey.images)


# ---------------------------------------------------------------- synthetic sets


def test_two_image() -> None:
    data = sf.data.load("two-image", size=6, channels=3)
    assert data.images.shape == (2, 3, 6, 6) and data.labels.tolist() == [0, 1]
    assert (data.images[0] == -1).all() and (data.images[1] == 1).all()


def radial_power_slope(fields: torch.Tensor, k_min: float, k_max: float) -> float:
    """Slope of log mean |fft2|² against log |k| over k_min ≤ |k| ≤ k_max (shell averages)."""
    size = fields.shape[-1]
    power = (torch.fft.fft2(fields.double()).abs() ** 2).mean(dim=(0, 1))  # [H, W]
    freqs = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)
    k = torch.sqrt(freqs[:, None] ** 2 + freqs[None, :] ** 2).round().long()
    shells = torch.arange(int(k_min), int(k_max) + 1)
    shell_power = torch.stack([power[k == s].mean() for s in shells])
    slope, _ = np.polyfit(np.log(shells.numpy()), np.log(shell_power.numpy()), 1)
    return float(slope)


@pytest.mark.parametrize("exponent", [1.0, 2.5])
def test_grf_spectrum_slope_matches_exponent(exponent: float) -> None:
    fields, spectrum = gaussian_random_field(64, 64, exponent, generator=torch.Generator().manual_seed(0))
    assert fields.shape == (64, 1, 64, 64)
    assert abs(spectrum.mean().item() - 1) < 1e-9 and spectrum[0, 0] == 0
    assert abs(fields.var().item() - 1) < 0.05  # unit variance per pixel, by construction
    assert fields.mean(dim=(-2, -1)).abs().max() < 1e-5  # no k = 0 mode
    assert abs(radial_power_slope(fields, 2, 20) + exponent) < 0.15
    data = sf.data.load("grf", n=64, size=64, exponent=exponent)
    assert data.images.abs().max() <= 1.0
    assert abs(radial_power_slope(data.images, 2, 20) + exponent) < 0.2
    assert data.provenance["clipped_fraction"] < 0.01


def test_grf_seed_split_and_channels() -> None:
    a = sf.data.load("grf", n=3, size=16)
    assert torch.equal(a.images, sf.data.load("grf", n=3, size=16).images)
    assert not torch.equal(a.images, sf.data.load("grf", n=3, size=16, seed=1).images)
    assert not torch.equal(a.images, sf.data.load("grf", n=3, size=16, split="test").images)
    rgb = sf.data.load("grf", n=2, size=16, channels=3)
    assert rgb.images.shape == (2, 3, 16, 16) and not torch.equal(rgb.images[:, 0], rgb.images[:, 1])
    assert torch.allclose(power_law_spectrum(8, 0.0)[1:, 1:], torch.ones(7, 7, dtype=torch.float64) * 64 / 63)


def test_patch_dictionary_default() -> None:
    patterns, priors = make_patch_dictionary()
    assert patterns.shape == (10, 5, 5) and priors.shape == (10,)
    assert set(patterns.unique().tolist()) == {-1.0, 1.0}
    assert abs(priors.sum().item() - 1) < 1e-12
    assert torch.allclose(priors[-2:], torch.tensor([0.45, 0.45], dtype=torch.float64))
    assert torch.allclose(priors[:8], torch.full((8,), 0.1 / 8, dtype=torch.float64))
    assert torch.equal(patterns[4:8], -patterns[:4])  # sign-flipped copies (Z₂ symmetry)
    assert (patterns[8] == 1).all() and (patterns[9] == -1).all()
    larger = make_patch_dictionary(patch_size=3, n_random=4, global_mass=0.5, seed=1)
    assert larger.patterns.shape == (6, 3, 3) and abs(larger.priors.sum().item() - 1) < 1e-12
    with pytest.raises(DataError, match="even"):
        make_patch_dictionary(n_random=3)


def test_patch_dictionary_fields_are_tilings_of_the_dictionary() -> None:
    data = sf.data.load("patch-dictionary", n=4, size=20)
    patterns = torch.tensor(data.provenance["dictionary"])  # [K, P, P]
    assert data.images.shape == (4, 1, 20, 20)
    for field in data.images[:, 0]:
        tiled = False
        for dy in range(5):
            for dx in range(5):
                blocks = field.roll((-dy, -dx), dims=(0, 1)).reshape(4, 5, 4, 5).permute(0, 2, 1, 3)
                blocks = blocks.reshape(-1, 1, 5, 5)
                tiled = tiled or bool((blocks == patterns[None]).all(dim=(-2, -1)).any(dim=1).all())
        assert tiled
    with pytest.raises(DataError, match="multiple"):
        sf.data.load("patch-dictionary", n=1, size=21)


# ---------------------------------------------------------------- shared options


def test_subset_and_classes() -> None:
    data = sf.data.load("digits", classes=[3, 5], subset=20, seed=1)
    assert len(data) == 20 and set(data.labels.tolist()) <= {3, 5}
    assert data.provenance["operations"] == ["classes [3, 5]", "subset 20 (seed 1)"]
    assert set(sf.data.load("digits", classes=7).labels.tolist()) == {7}
    assert not torch.equal(data.images, sf.data.load("digits", classes=[3, 5], subset=20, seed=2).images)
    for bad, message in ((0, "subset"), (True, "subset"), (2.5, "subset")):
        with pytest.raises(DataError, match=message):
            sf.data.load("digits", subset=bad)
    for bad in (10, [], "3", [1.5]):
        with pytest.raises(DataError, match="classes"):
            sf.data.load("digits", classes=bad)
    with pytest.raises(DataError, match="no labels"):
        sf.data.load("grf", n=2, size=8, classes=0)


def test_channels_binarize_pad() -> None:
    rgb = sf.data.load("digits", subset=4, channels=3)
    assert rgb.images.shape == (4, 3, 8, 8) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    grey = sf.data.apply_options(rgb, channels=1)
    assert torch.allclose(grey.images[:, 0], rgb.images[:, 0])
    binary = sf.data.load("digits", subset=4, binarize=0.0, pad_to=11)
    assert binary.images.shape == (4, 1, 11, 11) and set(binary.images.unique().tolist()) == {-1.0, 1.0}
    plain = sf.data.load("digits", subset=4)
    assert torch.equal(binary.images[:, :, 1:9, 1:9], torch.where(plain.images > 0, 1.0, -1.0))
    assert (binary.images[:, :, -2:] == -1).all() and (binary.images[:, :, 0] == -1).all()
    assert binary.provenance["operations"][-2:] == ["binarize at 0 → ±1", "pad 8×8 → 11×11 with −1"]
    assert sf.data.load("two-image", size=4, binarize=True).images.shape == (2, 1, 4, 4)
    for option, bad in (("channels", 2), ("binarize", 1.5), ("binarize", "x"), ("pad_to", 4), ("pad_to", -1)):
        with pytest.raises(DataError, match=option):
            sf.data.load("digits", subset=2, **{option: bad})
    two_channel = sf.data.load("two-image", size=2, channels=2)  # the loader's own option: any count
    assert two_channel.images.shape == (2, 2, 2, 2)
    with pytest.raises(DataError, match="channels=3 needs grey"):
        sf.data.apply_options(two_channel, channels=3)


def test_unknown_option_and_dataset() -> None:
    with pytest.raises(DataError, match="unknown option.*size.*accepted"):
        sf.data.load("mnist", size=3)
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        sf.data.load("nope")


# ---------------------------------------------------------------- CLI


def test_cli_data_info_digits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", "digits", "--subset", "12", "--classes", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "[1, 8, 8]" in out and "images      12" in out and "classes [1, 2]" in out


def test_cli_data_info_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    assert main(["data", "info", "folder", "--root", str(missing)]) != 0
    err = capsys.readouterr().err
    assert str(missing) in err and "folder not found" in err


def test_cli_data_list_and_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist", "grf", "patch-dictionary", "cifar10", "folder", "two-image", "natural"):
        assert name in out
    grid = tmp_path / "grid.png"
    args = ["data", "info", "grf", "--n", "5", "--size", "8", "-o", "exponent=1.5", "--grid", str(grid)]
    assert main(args) == 0
    assert "exponent: 1.5" in capsys.readouterr().out
    assert Image.open(grid).size == (5 * 9 - 1, 8)
    assert np.load(tmp_path / "grid.npz")["images"].shape == (5, 1, 8, 8)
    assert main(args) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
