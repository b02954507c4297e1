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
