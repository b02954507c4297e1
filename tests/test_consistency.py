"""Theorem 4.1 (local consistency of final samples), the Fig. 3 two-image experiment, and the mosaic command."""
import numpy as np
import pytest
import torch

import scorefield as sf
from scorefield.analysis.consistency import local_consistency, two_state_consistency
from scorefield.analysis.mosaic import patch_mosaic
from scorefield.cli import main as cli_main
from scorefield.runs import RunDir
from test_machines import ddim


def _two_state(size):
    return sf.data.ImageSet(torch.stack([torch.ones(1, size, size), -torch.ones(1, size, size)]), name="pm1")


def test_fig3_two_image_samples_are_locally_consistent_mosaics():
    size = 12
    model = sf.models.make("els", _two_state(size), patch_size=3, padding="circular")
    noise = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(0))
    broken = {}
    for steps in (20, 100):
        out = ddim(model, noise, steps)
        assert ((out.abs() - 1).abs() < 1e-3).all()                 # every pixel black or white
        rule = two_state_consistency(out, 3)
        # the general Theorem 4.1 check (nearest bank patch at ᾱ = 1) is the majority rule here
        assert torch.equal(local_consistency(out, model).consistent, rule)
        broken[steps] = int((~rule).sum())
    # measured: 10 of 576 pixels break at 20 steps, 6 at 100 steps (coarse steps break consistency)
    assert broken[100] <= broken[20] and broken[100] <= 0.02 * 4 * size * size


def test_ls_samples_are_locally_consistent():
    g = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(6, 1, 6, 6, generator=g) * 2 - 1)
    model = sf.models.make("ls", data, patch_size=3, padding="zeros")
    out = ddim(model, torch.randn(4, 1, 6, 6, generator=g), 60)
    report = local_consistency(out, model)
    assert report.fraction >= 0.9                                   # measured 0.97 at 100 steps on 8×8
    assert report.consistent.shape == (4, 6, 6)


def test_mosaic_library_and_command(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = sf.data.load("digits", subset=20, seed=0)
    model = sf.models.make("bbels", data, patch_size=3, padding="zeros")
    samples = data.images[:3].clone()
    arrays = patch_mosaic(samples, model)
    assert (arrays["source_image"] >= 0).all()
    # training images are their own mosaic: every pixel's nearest patch is its own (or an identical one)
    assert np.allclose(arrays["nearest"], samples.numpy(), atol=1e-3)
    run = RunDir.create("sample", {"model": "bbels", "model_options": {"patch_size": 3, "padding": "zeros"},
                                   "data": "digits", "data_options": {"subset": 20, "seed": 0}}, root=tmp_path)
    run.save_arrays("samples", samples=samples + 0.01 * torch.randn(samples.shape, generator=g))
    assert cli_main(["mosaic", str(run.path)]) == 0
    assert run.exists("mosaic.png") and run.exists("mosaic.npz")
    assert run.load_arrays("mosaic.npz")["source_image"].shape == (3, *samples.shape[2:])
    assert cli_main(["mosaic", str(tmp_path / "missing")]) == 2


def test_mosaic_refuses_a_model_without_provenance():
    data = sf.data.load("digits", subset=5, seed=0)
    with pytest.raises(ValueError, match="provenance"):
        patch_mosaic(data.images[:1], sf.models.make("tanh", data, patch_size=3))
