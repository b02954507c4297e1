import torch

from scorefield import convert


def test_round_trips_and_tweedie():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    x = ab.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().reshape(-1, 1, 1, 1) * eps
    assert torch.allclose(convert.eps_from_x0(x, x0, ab), eps)
    assert torch.allclose(convert.x0_from_eps(x, eps, ab), x0)
    s = convert.score_from_x0(x, x0, ab)
    assert torch.allclose(s, -eps / (1 - ab).sqrt().reshape(-1, 1, 1, 1))   # eq. 24
    assert torch.allclose(convert.x0_from_score(x, s, ab), x0)
    v = convert.drift_from_x0(x, x0, ab, torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.allclose(v, -0.5 * (x + s))                               # eq. 19
