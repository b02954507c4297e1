"""Long checks at realistic sizes (run with `pytest -m slow`; skipped by default and in CI)."""
import pytest

import scorefield as sf
from scorefield.analysis.consistency import local_consistency
from scorefield.analysis.nearest import nearest_training_images

pytestmark = pytest.mark.slow


def test_ideal_score_machine_memorizes_full_mnist():
    data = sf.data.load("mnist", split="train")                       # 50,000 images
    model = sf.models.make("is", data)
    noise = sf.sampling.initial_noise(4, (1, 28, 28), seed=0)
    samples = sf.sampling.sample(model, noise, steps=20)
    index, distance = nearest_training_images(samples, data)
    assert (distance < 1e-3).all(), distance


def test_bbels_on_mnist_is_creative_and_locally_consistent():
    data = sf.data.load("mnist", split="train", subset=500, seed=0)
    model = sf.models.make("bbels", data, patch_size=5, padding="zeros")
    samples = sf.sampling.sample(model, sf.sampling.initial_noise(2, (1, 28, 28), seed=0), steps=20)
    _, distance = nearest_training_images(samples, data)
    assert (distance > 0.05).all()                                     # not a copy of a training image
    report = local_consistency(samples, model)
    assert report.fraction > 0.5


def test_the_documented_command_reproduces_the_bundled_network(tmp_path):
    """TRAINED_BY in the bundled folder is the exact command; rerunning it gives a network that denoises
    held-out digits as well as the shipped one (bitwise equal weights on the same CPU; float summation order
    differs across CPUs, so the check is on behaviour)."""
    import shlex

    from scorefield import pretrained
    from scorefield.cli import main
    from scorefield.commands.train import denoising_check

    folder = pretrained.path()
    argv = shlex.split((folder / "TRAINED_BY").read_text().strip().splitlines()[-1])[1:]   # drop "scorefield"
    assert main([*argv, "--out", str(tmp_path), "--name", "again", "--no-progress"]) == 0
    held_out = sf.data.load("mnist", split="test", subset=256, seed=0).images
    shipped = {r["alpha_bar"]: r["mse"] for r in denoising_check(pretrained.load(), held_out)}
    again = {r["alpha_bar"]: r["mse"] for r in denoising_check(sf.models.load(tmp_path / "again"), held_out)}
    for ab, mse in shipped.items():
        assert abs(again[ab] - mse) <= 0.05 * mse, (ab, again[ab], mse)
