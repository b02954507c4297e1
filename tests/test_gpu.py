"""GPU paths (run with `pytest -m gpu` on a machine with CUDA; skipped by default and in CI).

Every machine, guidance with machines, and gradients on CUDA against the same computation on the CPU (≤ 1e-4)."""
import pytest
import torch

import scorefield as sf

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MACHINES = [("is", {}), ("es", {}), ("ls", {"patch_size": 3}), ("els", {"patch_size": 5, "padding": "circular"}),
            ("els", {"patch_size": 5, "cache": False}), ("els", {"patch_size": 5, "prune": True}),
            ("els", {"patch_size": 3, "dtype": "float64"}), ("bbels", {"patch_size": 5, "padding": "zeros"}),
            ("els", {"patch_size": 3, "conditional": True}), ("tanh", {"patch_size": 3}),
            ("dictionary", {"patch_size": 3}), ("gaussian", {})]


def small_data():
    g = torch.Generator().manual_seed(0)
    return sf.data.ImageSet(torch.rand(8, 1, 9, 9, generator=g) * 2 - 1, labels=torch.arange(8) % 2)


def _inputs(conditional=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 9, 9, generator=g)
    ab = torch.tensor([0.2, 0.7, 0.99])
    return x, ab, (torch.tensor([0, 1, 1]) if conditional else None)


@pytest.mark.parametrize("name,opts", MACHINES, ids=[f"{n}-{o}" for n, o in MACHINES])
def test_machines_on_cuda_match_cpu(name, opts):
    x, ab, labels = _inputs(opts.get("conditional", False))
    cpu = sf.models.make(name, small_data(), **opts)(x, ab, labels)
    model = sf.models.make(name, small_data(), device="cuda", **opts)
    gpu = model(x.cuda(), ab.cuda(), None if labels is None else labels.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    assert all(e["device"].startswith("cuda") for e in model.engine_log())


def test_guided_sampling_with_a_conditional_machine_on_cuda_matches_cpu():
    noise = sf.sampling.initial_noise(3, (1, 9, 9), seed=0)
    y = torch.tensor([0, 1, 0])
    guidance = sf.sampling.Guidance(scale=2.0, alpha_bar_min=0.2, alpha_bar_max=0.8)
    cpu_model = sf.models.make("els", small_data(), patch_size=3, conditional=True)
    gpu_model = sf.models.make("els", small_data(), patch_size=3, conditional=True, device="cuda")
    cpu = sf.sampling.sample(cpu_model, noise, steps=8, labels=y, guidance=guidance)
    gpu = sf.sampling.sample(gpu_model, noise.cuda(), steps=8, labels=y.cuda(), guidance=guidance)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,opts", [("els", {"patch_size": 3}), ("bbels", {"patch_size": 3}), ("is", {})])
def test_gradients_on_cuda_match_cpu(name, opts):
    x, ab, _ = _inputs()
    grads = []
    for device in ("cpu", "cuda"):
        model = sf.models.make(name, small_data(), device=device, **opts)
        xg = x.to(device).double().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg, ab.to(device).double()).square().sum(), xg)
        grads.append(g.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)


def test_resnet_trains_a_step_on_cuda(tmp_path):
    net = sf.models.make("resnet", small_data(), preset="tiny")
    result = sf.training.train(net, small_data(), steps=2, batch_size=4, device="cuda", out=tmp_path,
                               progress=False)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))


def test_calibration_and_prediction_on_cuda_match_cpu(tmp_path):
    """`calibrate(device='cuda')` / `predict(device='cuda')`: the network and machines on the GPU, the same
    schedule and the same samples (≤ 1e-3) as on the CPU."""
    data = small_data()
    results = {}
    for device in ("cpu", "cuda"):
        net = sf.models.make("bbels", data, patch_size=[3, 3, 5, 5], padding="zeros")
        cal = sf.experiments.calibrate(net, data, patch_sizes=[3, 5], seeds=range(100, 103), steps=4,
                                       out=tmp_path / device, progress=False, device=device)
        res = sf.experiments.predict(net, data, theories=["is", "bbels"], schedule_from=cal, seeds=range(3), steps=4,
                                     out=tmp_path / device, progress=False, device=device)
        results[device] = (cal.patch_sizes, res.samples)
    assert results["cpu"][0] == results["cuda"][0]
    for name, cpu in results["cpu"][1].items():
        assert results["cuda"][1][name].device.type == "cpu"            # saved and returned from the CPU
        torch.testing.assert_close(results["cuda"][1][name], cpu, rtol=0, atol=1e-3)


def test_sampling_runs_on_cuda_match_cpu(tmp_path):
    """`run_sampling(device='cuda')` / `scorefield sample --device cuda`: the files of a CPU run (≤ 1e-4)."""
    from scorefield.cli import main
    from scorefield.runs import RunDir

    common = ["sample", "--model", "els", "--model-opt", "patch_size=3", "--data", "digits", "--subset", "30",
              "--n", "4", "--steps", "5", "--out", str(tmp_path), "--no-progress"]
    assert main([*common, "--name", "cpu"]) == 0 and main([*common, "--name", "gpu", "--device", "cuda"]) == 0
    cpu = RunDir.open(tmp_path / "cpu").load_arrays("samples")["samples"]
    gpu = RunDir.open(tmp_path / "gpu").load_arrays("samples")["samples"]
    assert abs(cpu - gpu).max() <= 1e-4
