"""The CLI flags that choose what runs (--patch lists, --model-run, --model-opt, --sampler, --schedule) do what
they say: each run's config records the choice and the samples come from it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import scorefield as sf
from scorefield.cli import main

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "scorefield" / "pretrained" / "mnist-resnet-small"
BASE = ["sample", "--data", "digits", "--subset", "30", "--n", "2", "--steps", "3", "--no-progress"]


def _run(tmp_path: Path, name: str, *flags: str) -> tuple[dict, np.ndarray]:
    assert main([*BASE, *flags, "--out", str(tmp_path), "--name", name]) == 0
    config = json.loads((tmp_path / name / "config.json").read_text())
    with np.load(tmp_path / name / "samples.npz") as z:
        return config, z["samples"]


def test_patch_list_is_a_per_step_schedule(tmp_path):
    config, samples = _run(tmp_path, "p", "--model", "bbels", "--patch", "3,5,7")
    assert config["model_options"]["patch_size"] == [3, 5, 7]
    data = sf.data.load("digits", subset=30, seed=0)
    model = sf.models.make("bbels", data, patch_size=[3, 5, 7], padding="zeros")
    noise = sf.sampling.initial_noise(2, (1, 8, 8), seeds=[0, 1])
    want = sf.sampling.sample(model, noise, steps=3, seeds=[0, 1])
    np.testing.assert_allclose(samples, want.numpy(), atol=1e-6)


def test_model_opt_sampler_and_schedule_reach_the_sampler(tmp_path):
    config, samples = _run(tmp_path, "o", "--model", "els", "--patch", "3", "--model-opt", "dtype=float64",
                           "--sampler", "heun", "--schedule", "linear")
    assert (config["sampler"], config["schedule"], config["model_options"]["dtype"]) == ("heun", "linear",
                                                                                         "float64")
    data = sf.data.load("digits", subset=30, seed=0)
    model = sf.models.make("els", data, patch_size=3, dtype="float64")
    noise = sf.sampling.initial_noise(2, (1, 8, 8), seeds=[0, 1])
    want = sf.sampling.sample(model, noise.double(), steps=3, sampler="heun", schedule="linear", seeds=[0, 1])
    np.testing.assert_allclose(samples, want.float().numpy(), atol=1e-6)


def test_model_run_samples_the_trained_net_on_its_own_data(tmp_path):
    assert main(["sample", "--model-run", str(PRETRAINED), "--n", "1", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path), "--name", "m"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["data"] == "mnist" and config["data_options"]["subset"] == 1000     # the run's, not digits
    assert config["model"] == "resnet"
    with np.load(tmp_path / "m" / "samples.npz") as z:
        assert z["samples"].shape == (1, 1, 28, 28)
        net = sf.models.load(PRETRAINED)
        want = sf.sampling.sample(net, torch.from_numpy(z["noise"]), steps=2, seeds=[0])
        np.testing.assert_allclose(z["samples"], want.numpy(), atol=1e-5)
