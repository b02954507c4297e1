"""Misspelled names and option keys get one clear error with the closest valid name, not a TypeError."""
import pytest
import torch

import scorefield as sf
from scorefield.cli import main


def _data():
    return sf.data.ImageSet(torch.rand(4, 1, 6, 6) * 2 - 1, name="tiny")


def test_model_options_and_names_are_checked_with_a_suggestion():
    with pytest.raises(ValueError, match=r"'patchsize' \(did you mean 'patch_size'\?\)"):
        sf.models.make("els", _data(), patchsize=3)
    with pytest.raises(ValueError, match=r"unknown model 'elss' \(did you mean 'els'\?\)"):
        sf.models.make("elss", _data())
    with pytest.raises(ValueError, match="valid:"):
        sf.models.make("is", _data(), wibble=1)


def test_sampler_options_and_names_are_checked_with_a_suggestion():
    model = sf.models.make("is", _data())
    noise = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"'etaa' \(did you mean 'eta'\?\)"):
        sf.sampling.sample(model, noise, steps=2, etaa=0.5)
    with pytest.raises(ValueError, match=r"unknown sampler 'dim' \(did you mean 'ddim'\?\)"):
        sf.sampling.sample(model, noise, steps=2, sampler="dim")
    assert sf.sampling.sample(model, noise, steps=2, eta=0.5).shape == noise.shape


def test_cli_reports_a_misspelled_model_option_in_one_line(tmp_path, capsys):
    code = main(["sample", "--model", "els", "--model-opt", "patchsize=3", "--data", "digits", "--data-opt",
                 "subset=20", "--n", "2", "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "did you mean 'patch_size'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())                       # refused before a run directory was made


def test_labels_given_to_an_unconditional_model_are_refused_not_ignored():
    x = torch.randn(2, 1, 6, 6)
    for model in (sf.models.make("els", _data(), patch_size=3), sf.models.make("convnet", _data(), preset="tiny")):
        with pytest.raises(ValueError, match="unconditional but labels were given"):
            model(x, 0.5, torch.tensor([0, 1]))
        assert model(x, 0.5).shape == x.shape


def test_out_of_range_values_are_refused_up_front():
    with pytest.raises(ValueError, match="exceeds 2·max"):
        sf.models.make("els", _data(), patch_size=1001)
    with pytest.raises(ValueError, match="exceeds 2·max"):
        sf.models.make("bbels", _data(), patch_size=[3, 5, 13])
    assert sf.models.make("ls", _data(), patch_size=11) is not None          # 2·6 − 1: the largest allowed
    with pytest.raises(ValueError, match="eta"):
        sf.sampling.sample(sf.models.make("is", _data()), torch.randn(1, 1, 6, 6), steps=2, eta=-1)
    with pytest.raises(ValueError, match="positive integer"):
        sf.sampling.initial_noise(0, (1, 6, 6))


def test_damaged_run_files_are_named_in_one_error(tmp_path):
    run = tmp_path / "net"
    model = sf.models.make("convnet", _data(), preset="tiny")
    sf.training.train(model, _data(), steps=1, batch_size=2, out=tmp_path, name="net", progress=False)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])                   # truncated
    with pytest.raises(sf.checkpoints.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        sf.models.load(run)
    weights.write_bytes(b"")
    with pytest.raises(sf.checkpoints.CheckpointError, match="model.safetensors"):
        sf.models.load(run)
    (run / "model.json").write_text('{"model": {"arch"')               # truncated JSON
    with pytest.raises(sf.checkpoints.CheckpointError, match="model.json is not valid JSON"):
        sf.models.load(run)


def test_train_refuses_negative_samples_before_training(tmp_path, capsys):
    code = main(["train", "--arch", "convnet", "--preset", "tiny", "--data", "digits", "--subset", "8",
                 "--steps", "1", "--samples", "-3", "--out", str(tmp_path), "--no-progress"])
    assert code != 0 and "--samples" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resume_refuses_another_kind_of_run_and_unknown_config_keys(tmp_path):
    import json

    from scorefield.experiments.sample_run import SampleConfig, run_sampling

    cfg = SampleConfig(model="is", data="digits", data_options={"subset": 10}, n=2, steps=2, batch_size=2)
    run = run_sampling(cfg, root=tmp_path, name="s", progress=False)
    config = json.loads(run.file("config.json").read_text())
    run.file("config.json").write_text(json.dumps({**config, "stepz": 3}))
    with pytest.raises(sf.runs.RunError, match=r"'stepz' \(did you mean 'steps'\?\)"):
        run_sampling(cfg, resume=run.path, progress=False)
    run.file("config.json").write_text(json.dumps({**config, "kind": "train"}))
    with pytest.raises(sf.runs.RunError, match="not a sampling run"):
        run_sampling(cfg, resume=run.path, progress=False)


def test_diverging_training_stops_with_advice_instead_of_saving_nan_weights(tmp_path):
    model = sf.models.make("convnet", _data(), preset="tiny")
    with pytest.raises(ValueError, match="training diverged"):
        sf.training.train(model, _data(), steps=50, batch_size=2, lr=1e12, out=tmp_path, name="nan",
                          progress=False)
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_a_second_process_cannot_resume_a_run_in_use(tmp_path):
    import subprocess
    import sys

    run = sf.runs.RunDir.create("sample", {}, root=tmp_path, name="busy").lock()
    code = ("import sys, scorefield as sf\n"
            "try:\n    sf.runs.RunDir.open(sys.argv[1]).lock()\n"
            "except sf.runs.RunError as e:\n    print(e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "being worked on by process" in done.stdout
    assert run.lock() is run                                        # the holder may take it again
