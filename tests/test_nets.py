"""Trainable nets: shapes, conditioning, exact equivariance and receptive field, configs, bad input."""
from __future__ import annotations

import pytest
import torch

import scorefield as sf
from scorefield.convert import x0_from_eps
from scorefield.models.base import DenoiserInputError
from scorefield.models.nets import ALPHA_BAR_FLOOR, ARCHITECTURES, net_from_config
from scorefield.models.registry import ModelConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def image_set(size: int = 9, n: int = 6, channels: int = 1) -> sf.data.ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    return sf.data.ImageSet(images, labels=torch.arange(n) % 3, name="test")


def test_contract_call_on_9x9():
    data = image_set()
    x = torch.randn(2, 1, 9, 9)
    out = sf.models.make("resnet", data, preset="small", padding="zeros")(x, torch.tensor([0.3, 0.8]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_every_architecture_denoises_with_and_without_labels(arch, padding):
    data = image_set(size=9, channels=3)
    torch.manual_seed(0)
    model = sf.models.make(arch, data, preset="tiny", padding=padding, conditional=True)
    x = torch.randn(3, 3, 9, 9)
    ab = torch.tensor([0.0, 0.5, 1.0])
    conditional = model(x, ab, labels=torch.tensor([0, 1, 2]))
    unconditional = model(x, ab)  # labels=None is the null class
    assert conditional.shape == x.shape and torch.isfinite(conditional).all()
    assert torch.isfinite(unconditional).all()
    assert not torch.allclose(conditional, unconditional)
    explicit_null = model(x, ab, labels=torch.full((3,), model.null_label))
    assert torch.equal(explicit_null, unconditional)


def test_denoise_is_x0_from_predicted_noise_with_guarded_alpha_bar():
    data = image_set()
    model = sf.models.make("convnet", data, preset="tiny")
    x = torch.randn(3, 1, 9, 9)
    ab = torch.tensor([0.0, 0.3, 0.9])
    with torch.no_grad():
        eps = model.predict_eps(x, ab)
        expected = x0_from_eps(x, eps, ab.clamp_min(ALPHA_BAR_FLOOR))
        assert torch.allclose(model(x, ab), expected)


def test_time_input_follows_the_schedule():
    data = image_set()
    for schedule in ("cosine", "linear", "constant"):
        model = sf.models.make("convnet", data, preset="tiny", schedule=schedule)
        sched = sf.schedules.get_schedule(schedule)
        t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64) * (sched.t_max - sched.t_min) + sched.t_min
        tau = model.time_input(sched.alpha_bar(t))
        assert torch.allclose(tau, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), atol=1e-6)


def test_circular_resnet_is_exactly_translation_equivariant():
    data = image_set(size=12)
    torch.manual_seed(1)
    model = sf.models.make("resnet", data, preset="tiny", padding="circular")
    x = torch.randn(2, 1, 12, 12)
    ab = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        out = model(x, ab)
        for shift in [(3, 0), (0, 5), (-4, 7)]:
            rolled = model(torch.roll(x, shift, dims=(2, 3)), ab)
            assert torch.allclose(rolled, torch.roll(out, shift, dims=(2, 3)), atol=1e-5)


def test_zero_padded_resnet_is_not_translation_equivariant():
    data = image_set(size=12)
    torch.manual_seed(1)
    model = sf.models.make("resnet", data, preset="tiny", padding="zeros")
    x = torch.randn(1, 1, 12, 12)
    with torch.no_grad():
        shifted = model(torch.roll(x, 3, dims=3), 0.5)
        assert not torch.allclose(shifted, torch.roll(model(x, 0.5), 3, dims=3), atol=1e-3)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_resnet_gradient_vanishes_exactly_outside_its_17x17_receptive_field(padding):
    data = image_set(size=25)
    torch.manual_seed(2)
    model = sf.models.make("resnet", data, preset="tiny", padding=padding)
    assert model.formal_receptive_field == 17
    x = torch.randn(1, 1, 25, 25, requires_grad=True)
    model(x, 0.5)[0, 0, 12, 12].backward()
    grad = x.grad[0, 0].abs()
    inside = torch.zeros(25, 25, dtype=torch.bool)
    inside[12 - 8:12 + 9, 12 - 8:12 + 9] = True
    assert grad[~inside].max() == 0.0
    assert (grad[inside] > 0).float().mean() > 0.9  # the field is really used up to its border
    assert grad[12 - 8, 12].item() > 0 and grad[12 + 8, 12 + 8].item() > 0


def test_convnet_receptive_field_matches_its_depth():
    data = image_set(size=25)
    model = sf.models.make("convnet", data, preset="tiny")
    r = model.formal_receptive_field // 2
    x = torch.randn(1, 1, 25, 25, requires_grad=True)
    model(x, 0.5)[0, 0, 12, 12].backward()
    grad = x.grad[0, 0].abs()
    assert grad[12, 12 + r + 1:].max() == 0 and grad[12, 12 + r] > 0


def test_config_rebuilds_the_same_network():
    data = image_set(size=9)
    for arch in ARCHITECTURES:
        model = sf.models.make(arch, data, preset="tiny", padding="circular", conditional=True, schedule="linear")
        clone = net_from_config(model.config)
        clone.load_state_dict(model.state_dict())
        x = torch.randn(2, 1, 9, 9)
        with torch.no_grad():
            assert torch.equal(model(x, 0.4, labels=torch.tensor([0, 2])), clone(x, 0.4, labels=torch.tensor([0, 2])))
        assert clone.config == model.config
        remade = sf.models.make(arch, data, **{k: v for k, v in model.config.items() if k != "name"})
        assert remade.config == model.config


def test_size_overrides_and_presets_change_only_the_width():
    data = image_set()
    paper = sf.models.make("resnet", data, preset="paper")
    small = sf.models.make("resnet", data, preset="small")
    wide = sf.models.make("resnet", data, preset="small", width=48)
    assert paper.config["width"] == 256 and small.config["width"] < 256 and wide.config["width"] == 48
    assert paper.formal_receptive_field == small.formal_receptive_field == 17
    assert sf.models.make("unet", data, preset="paper").config["channels"] == [64, 128, 256]


def test_bad_options_give_clear_errors():
    data = image_set()
    with pytest.raises(ModelConfigError, match="unknown preset 'huge'"):
        sf.models.make("resnet", data, preset="huge")
    with pytest.raises(ModelConfigError, match="unknown option"):
        sf.models.make("resnet", data, preset="tiny", channels=[4, 8])
    with pytest.raises(ModelConfigError, match="padding"):
        sf.models.make("resnet", data, preset="tiny", padding="reflect")
    with pytest.raises(ModelConfigError, match="positive integer"):
        sf.models.make("resnet", data, preset="tiny", width=0)
    with pytest.raises(ModelConfigError, match="emb_dim must be even"):
        sf.models.make("convnet", data, preset="tiny", emb_dim=15)
    with pytest.raises(ModelConfigError, match="schedule"):
        sf.models.make("resnet", data, preset="tiny", schedule="quadratic")
    unlabelled = sf.data.ImageSet(data.images)
    with pytest.raises(ModelConfigError, match="labelled data"):
        sf.models.make("resnet", unlabelled, preset="tiny", conditional=True)
    with pytest.raises(ModelConfigError, match="at least 4×4"):
        sf.models.make("unet", sf.data.ImageSet(torch.zeros(2, 1, 3, 3)), preset="tiny")


def test_bad_calls_give_clear_errors():
    model = sf.models.make("resnet", image_set(), preset="tiny", conditional=True)
    with pytest.raises(DenoiserInputError, match="built for"):
        model(torch.randn(1, 1, 10, 10), 0.5)
    with pytest.raises(DenoiserInputError, match=r"\[B, C, H, W\]"):
        model(torch.randn(1, 9, 9), 0.5)
    with pytest.raises(DenoiserInputError, match="labels must lie"):
        model(torch.randn(2, 1, 9, 9), 0.5, labels=torch.tensor([0, 7]))
    with pytest.raises(DenoiserInputError, match="alpha_bar"):
        model(torch.randn(2, 1, 9, 9), 1.5)
