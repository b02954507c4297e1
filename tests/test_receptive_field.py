"""Effective receptive fields: exact zeros outside a ResNet's formal field, autograd = finite differences,
the mass-radius on maps with known answers, the command on a trained run and on an analytic machine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scorefield as sf
from scorefield import cli
from scorefield.analysis.receptive_field import ReceptiveFieldError, receptive_field, size_holding_mass
from scorefield.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def noise_set(size: int, n: int = 4) -> sf.data.ImageSet:
    g = torch.Generator().manual_seed(0)
    return sf.data.ImageSet(torch.rand(n, 1, size, size, generator=g) * 2 - 1, name="noise")


def test_resnet_map_is_zero_outside_17x17_and_sizes_fit_inside():
    torch.manual_seed(0)
    model = sf.models.make("resnet", noise_set(25), preset="tiny")
    result = receptive_field(model, [0.2, 0.9], n=3, progress=False)
    assert result.maps.shape == (2, 25, 25) and result.centre == (12, 12) and result.method == "autograd"
    outside = np.ones((25, 25), dtype=bool)
    outside[4:21, 4:21] = False
    assert (result.maps[:, outside] == 0).all()
    assert (result.maps[:, 4, 12] > 0).all()
    assert (result.patch_size <= 17).all() and (result.patch_size_without_centre <= 17).all()
    assert (result.radius <= 8 * np.sqrt(2)).all()


def test_autograd_and_finite_differences_agree():
    torch.manual_seed(0)
    model = sf.models.make("convnet", noise_set(7), preset="tiny").double()
    auto = receptive_field(model, [0.5], n=2, method="autograd", progress=False)
    fd = receptive_field(model, [0.5], n=2, method="fd", progress=False)
    assert fd.method == "fd"
    np.testing.assert_allclose(fd.maps, auto.maps, rtol=1e-3, atol=1e-6)


def test_analytic_machine_uses_its_patch_size():
    data = sf.data.load("digits", subset=40)
    model = sf.models.make("els", data, patch_size=3, padding="circular")
    result = receptive_field(model, [0.5], n=2, data=data, progress=False)
    assert result.patch_size[0] <= 3
    assert (result.maps[0][np.abs(np.arange(8) - 4)[:, None].repeat(8, 1) > 1] == 0).all()


def test_size_holding_mass_on_known_maps():
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    assert size_holding_mass(delta, (4, 4), 0.9, "euclidean") == 0.0
    block = np.zeros((9, 9))
    block[3:6, 3:6] = 1.0
    assert size_holding_mass(block, (4, 4), 0.9, "chebyshev") == 1.0
    assert size_holding_mass(block, (4, 4), 0.5, "euclidean") == 1.0  # centre + 4 neighbours hold 5/9
    ring = np.zeros((9, 9))
    ring[4, 4], ring[4, 7] = 100.0, 1.0
    assert size_holding_mass(ring, (4, 4), 0.9, "euclidean", without_centre=True) == 3.0


def test_bad_options_are_refused():
    model = sf.models.make("convnet", noise_set(7), preset="tiny")
    with pytest.raises(ReceptiveFieldError, match="mass"):
        receptive_field(model, [0.5], mass=0.0, progress=False)
    with pytest.raises(ReceptiveFieldError, match="method"):
        receptive_field(model, [0.5], method="magic", progress=False)
    with pytest.raises(ReceptiveFieldError, match="alpha_bars"):
        receptive_field(model, [1.5], progress=False)
    with pytest.raises(ReceptiveFieldError, match="model expects"):
        receptive_field(model, [0.5], data=noise_set(9), progress=False)


def test_command_on_a_run_and_on_a_machine(tmp_path, capsys):
    data = noise_set(9)
    torch.manual_seed(0)
    trained = train(sf.models.make("resnet", data, preset="tiny"), data, run_dir=tmp_path / "run", steps=1,
                    batch_size=4, progress=False)
    assert cli.main(["receptive-field", str(trained.run_dir), "--n", "2", "--alpha-bars", "0.3,0.8",
                     "--out", str(tmp_path), "--name", "rf", "--no-progress"]) == 0
    out = tmp_path / "rf"
    for name in ("receptive_field.csv", "receptive_field.md", "receptive_field.png", "receptive_field_size.png",
                 "receptive_field.npz"):
        assert (out / name).is_file(), name
    assert "| P90 | P90_without_centre | r90 |" in capsys.readouterr().out
    assert cli.main(["receptive-field", "--model", "gaussian", "--data", "digits", "--subset", "30", "--n", "2",
                     "--alpha-bars", "0.5", "--out", str(tmp_path), "--name", "rf2", "--no-progress"]) == 0
    assert (tmp_path / "rf2" / "receptive_field.csv").read_text().count("\n") == 2
    assert cli.main(["receptive-field", "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
