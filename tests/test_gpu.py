"""GPU paths (run with `pytest -m gpu` on a machine with CUDA; skipped by default and in CI)."""
import pytest
import torch

import scorefield as sf

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_data():
    g = torch.Generator().manual_seed(0)
    return sf.data.ImageSet(torch.rand(8, 1, 9, 9, generator=g) * 2 - 1, labels=torch.arange(8) % 2)


@pytest.mark.parametrize("name,opts", [("is", {}), ("els", {"patch_size": 5, "padding": "circular"}),
                                       ("bbels", {"patch_size": 5, "padding": "zeros"}),
                                       ("gaussian", {})])
def test_machines_on_cuda_match_cpu(name, opts):
    model = sf.models.make(name, small_data(), **opts)
    x = torch.randn(3, 1, 9, 9)
    ab = torch.tensor([0.2, 0.7, 0.99])
    cpu = model(x, ab)
    gpu = model.to("cuda")(x.cuda(), ab.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def test_resnet_trains_a_step_on_cuda(tmp_path):
    net = sf.models.make("resnet", small_data(), preset="tiny")
    result = sf.training.train(net, small_data(), steps=2, batch_size=4, device="cuda", out=tmp_path,
                               progress=False)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
