import math

import pytest
import torch

from scorefield import schedules as S

ALL = [S.CosineSchedule(), S.LinearVPSchedule(), S.ConstantVPSchedule(), S.EDMSchedule()]


def interior_times(s: S.Schedule, n: int = 7) -> torch.Tensor:
    lo, hi = s.t_min, s.t_max
    return torch.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n, dtype=torch.float64)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.name)
def test_gamma_is_minus_half_dlog_alpha_bar(sched):
    """kamb-ganguli eq. 21: ᾱ = exp(−2∫γ) ⇔ γ = −½ d log ᾱ/dt (central finite difference)."""
    t = interior_times(sched)
    h = 1e-6 * (sched.t_max - sched.t_min)
    fd = -0.5 * (torch.log(sched.alpha_bar(t + h)) - torch.log(sched.alpha_bar(t - h))) / (2 * h)
    assert torch.allclose(sched.gamma(t), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.name)
def test_alpha_bar_round_trip_and_sigma(sched):
    t = interior_times(sched)
    ab = sched.alpha_bar(t)
    assert ((ab > 0) & (ab < 1)).all() and (ab[1:] < ab[:-1]).all()  # decreasing in t
    assert torch.allclose(sched.t_from_alpha_bar(ab), t, rtol=1e-7, atol=1e-9)
    assert torch.allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones_like(t))
    assert torch.allclose(1 / (1 + sched.sigma_ve(t) ** 2), ab)
    assert torch.allclose(sched.t_from_sigma_ve(sched.sigma_ve(t)), t, rtol=1e-6)


def test_cosine_endpoints_and_constant_closed_form():
    c = S.CosineSchedule()
    assert float(c.alpha_bar(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(c.alpha_bar(torch.tensor(1.0))) < 1e-12
    k = S.ConstantVPSchedule()
    t = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.allclose(k.alpha(t), torch.exp(-t / 2))                 # α = e^{−t/2}
    assert torch.allclose(k.sigma(t) ** 2, 1 - torch.exp(-t))            # σ² = 1 − e^{−t}


def test_grids():
    g = S.log_grid(4, 50.0, 1e-3)
    assert g[0] == pytest.approx(50.0) and g[-1] == pytest.approx(1e-3)
    ratios = g[1:] / g[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))            # eq. 59: geometric
    u = S.uniform_grid(20, 1.0, 0.0)
    assert len(u) == 21 and u[0] == 1.0 and u[-1] == 0.0
    k = S.karras_sigmas(18)
    assert k[0] == pytest.approx(80.0) and k[-1] == pytest.approx(0.002) and (k[1:] < k[:-1]).all()
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(S.karras_sigmas(3)[1]) == pytest.approx(mid)
    kg = S.karras_grid(10, S.CosineSchedule())
    assert (kg[1:] < kg[:-1]).all() and kg[-1] == 0.0


def test_bad_names_and_steps():
    with pytest.raises(S.ScheduleError, match="unknown schedule"):
        S.get_schedule("nope")
    with pytest.raises(S.ScheduleError, match="positive integer"):
        S.uniform_grid(0, 1.0, 0.0)
    with pytest.raises(S.ScheduleError, match="unknown time grid"):
        S.time_grid(S.CosineSchedule(), 5, "weird")
    assert math.isfinite(float(S.get_schedule("edm").gamma(torch.tensor(1.0))))
