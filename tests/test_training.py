"""Score-matching training: checkpoints round-trip, resume equals an uninterrupted run, a tiny net overfits,
the train / load commands work, bad options are refused."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import scorefield as sf
from scorefield import cli
from scorefield.checkpoints import load_checkpoint, load_denoiser
from scorefield.training import TrainConfig, TrainingError, dsm_loss, epoch_permutation, recipe, train

pytestmark = pytest.mark.usefixtures("one_thread")


def small_set(n: int = 12, size: int = 8) -> sf.data.ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return sf.data.ImageSet(images, labels=torch.arange(n) % 3, name="small")


def tiny(arch: str = "convnet", data: sf.data.ImageSet | None = None, **options) -> sf.models.Denoiser:
    torch.manual_seed(0)
    return sf.models.make(arch, data if data is not None else small_set(), preset="tiny", **options)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    data = small_set()
    result = train(tiny("resnet", data, conditional=True), data, run_dir=tmp_path / "run", steps=3,
                   batch_size=4, progress=False)
    loaded = sf.models.load(tmp_path / "run")
    x = torch.randn(4, 1, 8, 8)
    ab = torch.tensor([0.1, 0.4, 0.7, 0.95])
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(loaded(x, ab, labels), result.model.cpu()(x, ab, labels))
    assert loaded.config == result.model.config
    # weights and optimizer state are plain safetensors; metadata is JSON
    assert set(load_file(tmp_path / "run" / "model.safetensors")) == set(loaded.state_dict())
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["optimizer"]["param_groups"][0]["lr"] > 0


def _interrupt_at(step: int):
    def callback(current: int, loss: float) -> None:
        if current == step:
            raise KeyboardInterrupt
    return callback


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_after_interruption_equals_uninterrupted_training(tmp_path, ema):
    data = small_set()
    options = dict(steps=10, batch_size=5, lr=1e-2, lr_decay=0.99, ema=ema, checkpoint_every=3, progress=False,
                   grad_clip=1.0, seed=3)
    straight = train(tiny(conditional=True, data=data), data, run_dir=tmp_path / "a", **options)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(conditional=True, data=data), data, run_dir=tmp_path / "b", callback=_interrupt_at(5), **options)
    assert load_checkpoint(tmp_path / "b").step == 3
    resumed = train(tiny(conditional=True, data=data), data, run_dir=tmp_path / "b", **options)
    for name, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[name], atol=1e-6, rtol=0), name
    # the metrics of the redone steps are not duplicated
    steps = [m["step"] for m in resumed.run.read_metrics()]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_a_start_killed_before_its_first_checkpoint_restarts_without_duplicate_metrics(tmp_path):
    data = small_set()
    options = dict(steps=3, batch_size=5, lr=1e-2, checkpoint_every=100, progress=False, seed=1)
    straight = train(tiny(data=data), data, run_dir=tmp_path / "a", **options)
    killed = tmp_path / "b"
    train(tiny(data=data), data, run_dir=killed, **options)
    (killed / "checkpoint.json").unlink()               # as if killed between the last metric line and the checkpoint
    again = train(tiny(data=data), data, run_dir=killed, **options)
    assert [m["step"] for m in again.run.read_metrics()] == [m["step"] for m in straight.run.read_metrics()]
    np.testing.assert_array_equal(np.load(killed / "loss.npz")["step"], np.load(tmp_path / "a" / "loss.npz")["step"])


def test_a_folder_left_by_a_start_killed_before_its_config_is_reused_not_sidestepped(tmp_path):
    data = small_set()
    left = tmp_path / "unit"
    left.mkdir()
    (left / ".config.json.tmp-12345").write_text("{")          # killed inside RunDir.create
    train(tiny(data=data), data, run_dir=left, steps=2, batch_size=5, progress=False)
    assert (left / "model.safetensors").is_file() and not (tmp_path / "unit-1").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("a user's file")
    train(tiny(data=data), data, run_dir=tmp_path / "kept", steps=2, batch_size=5, progress=False)
    assert (tmp_path / "kept" / "notes.txt").is_file() and (tmp_path / "kept-1" / "model.safetensors").is_file()


def test_extending_a_finished_run_continues_its_schedule(tmp_path):
    data = small_set()
    options = dict(batch_size=5, lr=1e-2, checkpoint_every=4, progress=False)
    once = train(tiny(data=data), data, run_dir=tmp_path / "a", steps=8, **options)
    train(tiny(data=data), data, run_dir=tmp_path / "b", steps=4, **options)
    twice = train(tiny(data=data), data, run_dir=tmp_path / "b", steps=8, **options)
    for name, value in once.model.state_dict().items():
        assert torch.allclose(value, twice.model.state_dict()[name], atol=1e-6, rtol=0), name


def _fixed_loss(model, data: sf.data.ImageSet) -> float:
    """ε-prediction loss on a fixed batch of noise and times (the same before and after training)."""
    batch = data.images.repeat(128, 1, 1, 1)  # [256, C, H, W]
    with torch.no_grad():
        return dsm_loss(model.eval(), batch, None, TrainConfig(), model.schedule,
                        torch.Generator().manual_seed(123)).item()


def test_a_tiny_net_overfits_the_two_image_set(tmp_path):
    data = sf.data.load("two-image", size=8)
    model = tiny("convnet", data, padding="circular")
    before = _fixed_loss(model, data)
    result = train(model, data, run_dir=tmp_path / "run", steps=400, batch_size=2, lr=1e-2, lr_decay=0.995,
                   log_every=50, progress=False)
    after = _fixed_loss(result.model, data)
    assert after < before / 10, (before, after)
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "loss.npz").is_file()


def test_data_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 3))
    assert not torch.equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 4))
    assert sorted(epoch_permutation(50, 0, 0).tolist()) == list(range(50))


def test_recipes_hold_the_papers_settings():
    kg = recipe("kamb-ganguli")
    assert (kg["lr"], kg["batch_size"], kg["lr_decay"], kg["epochs"]) == (1e-4, 128, 0.999965, 300)
    crit = recipe("criticality")
    assert (crit["optimizer"], crit["lr"], crit["grad_clip"], crit["time_sampling"]) == ("adamw", 2e-4, 1.0,
                                                                                        "log-uniform")


def test_log_uniform_time_sampling_and_adamw_train(tmp_path):
    data = small_set()
    model = tiny("unet-small", data, schedule="constant")
    result = train(model, data, run_dir=tmp_path / "run", steps=2, batch_size=4, progress=False,
                   **{k: v for k, v in recipe("criticality").items() if k not in ("batch_size", "epochs")})
    # an untrained ε-predictor's loss E‖ε − ε̂‖²/D is ≈ 1 + E‖ε̂‖²/D: finite and of order one, not 0 or NaN
    assert result.steps == 2 and math.isfinite(result.final_loss) and 0.2 < result.final_loss < 20


def test_bad_training_options_are_refused(tmp_path):
    data = small_set()
    model = tiny(data=data)
    with pytest.raises(TrainingError, match="optimizer"):
        train(model, data, run_dir=tmp_path / "a", optimizer="sgd", progress=False)
    with pytest.raises(TrainingError, match="time_sampling"):
        train(model, data, run_dir=tmp_path / "b", time_sampling="beta", progress=False)
    with pytest.raises(TrainingError, match="schedule"):
        train(model, data, run_dir=tmp_path / "c", schedule="linear", progress=False)
    with pytest.raises(TrainingError, match="built for"):
        train(model, small_set(size=10), run_dir=tmp_path / "d", progress=False)
    with pytest.raises(TrainingError, match="recipe"):
        recipe("fastest")
    with pytest.raises(TrainingError, match="trainable net"):
        train(sf.models.make("gaussian", data), data, progress=False)
    train(model, data, run_dir=tmp_path / "e", steps=1, batch_size=4, progress=False)
    with pytest.raises(TrainingError, match="lr"):
        train(tiny(data=data), data, run_dir=tmp_path / "e", steps=2, batch_size=4, lr=0.5, progress=False)


def test_load_of_a_folder_without_weights_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_denoiser(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no trained weights"):
        load_denoiser(tmp_path / "empty")


def test_train_resume_and_load_commands(tmp_path, capsys):
    args = ["train", "--arch", "convnet", "--preset", "tiny", "--data", "digits", "--subset", "16", "--steps", "3",
            "--batch-size", "8", "--out", str(tmp_path), "--name", "run", "--no-progress", "--checkpoint-every", "2"]
    assert cli.main(args) == 0
    run = tmp_path / "run"
    assert json.loads((run / "model.json").read_text())["step"] == 3
    assert cli.main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
    assert json.loads((run / "model.json").read_text())["step"] == 5
    capsys.readouterr()
    assert cli.main(["load", str(run), "--n", "8"]) == 0
    printed = capsys.readouterr().out
    assert "denoising MSE" in printed and '"parameters"' in printed


def test_train_command_draws_samples(tmp_path):
    pytest.importorskip("scorefield.sampling").sample  # noqa: B018
    args = ["train", "--arch", "resnet", "--preset", "tiny", "--data", "two-image", "--steps", "2", "--batch-size",
            "2", "--out", str(tmp_path), "--name", "run", "--no-progress", "--samples", "3", "--sample-steps", "2"]
    assert cli.main(args) == 0
    samples = (tmp_path / "run")
    assert (samples / "samples.png").is_file()
    import numpy as np
    with np.load(samples / "samples.npz") as z:
        assert z["samples"].shape == (3, 1, 8, 8) and np.isfinite(z["samples"]).all()


def test_train_command_reports_bad_input(tmp_path, capsys):
    assert cli.main(["train", "--data", "no-such-set", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert cli.main(["load", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "huge"])
