"""Classifier-free guidance with analytic machines: a conditional machine called with labels=None is the
unconditional machine over every class, so D_u + w·(D_c − D_u) runs for machines as for networks."""
import pytest
import torch

import scorefield as sf


def _labelled(n=6, size=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=gen) * 2 - 1
    return sf.data.ImageSet(images, labels=torch.arange(n) % 3, name="three-classes")


@pytest.mark.parametrize("name,options", [("els", dict(patch_size=3, padding="circular")),
                                          ("bbels", dict(patch_size=3)), ("ls", dict(patch_size=3)),
                                          ("is", {})])
def test_guided_machine_is_the_hand_formula(name, options):
    data = _labelled()
    machine = sf.models.make(name, data, conditional=True, dtype="float64", **options)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 6, 6, generator=gen, dtype=torch.float64)
    ab = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    # by hand: D_c from machines built on each class alone, D_u from the machine on all images
    uncond = sf.models.make(name, data, dtype="float64", **options)(x, ab)
    cond = torch.stack([sf.models.make(name, data.of_class(int(c)), dtype="float64", **options)(
        x[i:i + 1], ab[i:i + 1])[0] for i, c in enumerate(y)])
    w = 2.5
    expected = uncond + w * (cond - uncond)
    got = sf.sampling.guided(machine, sf.sampling.Guidance(scale=w))(x, ab, y)
    assert not torch.allclose(cond, uncond, atol=1e-3)     # the guidance term is not trivially zero
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_sample_with_guidance_and_a_conditional_machine():
    data = _labelled()
    machine = sf.models.make("els", data, patch_size=3, padding="circular", conditional=True, dtype="float64")
    uncond = sf.models.make("els", data, patch_size=3, padding="circular", dtype="float64")
    per_class = {c: sf.models.make("els", data.of_class(c), patch_size=3, padding="circular", dtype="float64")
                 for c in range(3)}
    w = 1.8

    def by_hand(x, ab, labels=None):
        u = uncond(x, ab)
        c = torch.cat([per_class[int(lab)](x[i:i + 1], ab[i:i + 1]) for i, lab in enumerate(labels)])
        return u + w * (c - u)

    noise = sf.sampling.initial_noise(3, (1, 6, 6), seeds=[0, 1, 2]).double()
    y = torch.tensor([2, 0, 1])
    got = sf.sampling.sample(machine, noise, steps=6, labels=y, guidance=sf.sampling.Guidance(scale=w))
    expected = sf.sampling.sample(by_hand, noise, steps=6, labels=y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_guidance_window_switches_off_outside():
    data = _labelled()
    machine = sf.models.make("els", data, patch_size=3, padding="circular", conditional=True, dtype="float64")
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ab = torch.tensor([0.3, 0.8], dtype=torch.float64)
    y = torch.tensor([1, 2])
    window = sf.sampling.Guidance(scale=3.0, alpha_bar_min=0.5, alpha_bar_max=1.0)
    got = sf.sampling.guided(machine, window)(x, ab, y)
    plain = machine(x, ab, y)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=1e-12)      # ᾱ = 0.3 is outside: weight 1
    assert not torch.allclose(got[1], plain[1], atol=1e-4)                # ᾱ = 0.8 is guided


def test_cli_samples_with_a_guidance_pulse_and_refuses_it_without_classes(tmp_path, capsys):
    from scorefield.cli import main

    common = ["sample", "--model", "els", "--model-opt", "patch_size=3", "--data", "digits", "--data-opt",
              "subset=60", "--n", "3", "--steps", "4", "--out", str(tmp_path)]
    assert main([*common, "--model-opt", "conditional=true", "--guidance", "2",
                 "--guidance-window", "0.2:0.8", "--name", "guided"]) == 0
    run = sf.runs.RunDir.open(tmp_path / "guided")
    assert run.config["guidance"] == 2.0
    assert run.config["guidance_window"] == {"variable": "alpha_bar", "min": 0.2, "max": 0.8}
    assert main([*common, "--model-opt", "conditional=true", "--guidance", "2", "--guidance-window", "step:2:3",
                 "--name", "stepped"]) == 0
    assert sf.runs.RunDir.open(tmp_path / "stepped").read_json("guidance.json")["steps_covered"] == [2, 3]
    assert "guidance ×2.0 at sampler steps [2, 3]" in capsys.readouterr().out
    assert main([*common, "--guidance", "2", "--name", "plain"]) != 0
    assert "class-conditional" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()


def test_guidance_windows_convert_between_variables_and_back_exactly():
    sched = sf.schedules.get_schedule("cosine")
    grid = sf.sampling.default_grid(sched, 20, "ddim")
    ab = sched.alpha_bar(grid[:-1])                                      # ᾱ of the 20 denoiser calls
    by_step = sf.sampling.Guidance(2.0, step_min=6, step_max=11)
    assert by_step.steps(sched, grid) == list(range(6, 12))
    lo, hi = by_step.alpha_bar_window(sched, grid)
    inside = [i for i in range(20) if lo <= float(ab[i]) <= hi]
    assert inside == list(range(6, 12))
    assert [i for i in range(20) if lo <= float(ab[i].float()) <= hi] == inside   # float32 ᾱ still inside
    # the same window in σ, t, ᾱ and fraction covers the same steps
    sig = ((1 - ab) / ab).sqrt()
    same = [sf.sampling.Guidance(2.0, sigma_min=float(sig[11]), sigma_max=float(sig[6])),
            sf.sampling.Guidance(2.0, t_min=float(grid[11]), t_max=float(grid[6])),
            sf.sampling.Guidance(2.0, alpha_bar_min=float(ab[6]), alpha_bar_max=float(ab[11])),
            sf.sampling.Guidance(2.0, fraction_min=6 / 20, fraction_max=11 / 20)]
    for g in same:
        assert g.steps(sched, grid) == list(range(6, 12)), g.variable
    # σ ↔ ᾱ round trip is exact
    g = sf.sampling.Guidance(1.5, sigma_min=0.5, sigma_max=2.0)
    a_lo, a_hi = g.alpha_bar_window()
    assert a_lo == pytest.approx(1 / 5) and a_hi == pytest.approx(1 / 1.25)
    with pytest.raises(ValueError, match="one variable"):
        sf.sampling.Guidance(2.0, sigma_min=1.0, step_max=3)
    with pytest.raises(ValueError, match="needs the schedule"):
        sf.sampling.Guidance(2.0, t_min=0.2).weight(torch.tensor([0.5]))


def test_a_step_window_guides_exactly_those_steps_in_sampling():
    data = _labelled()
    machine = sf.models.make("els", data, patch_size=3, padding="circular", conditional=True)
    seen = []

    def recording(x, ab, labels=None):
        seen.append(float(ab[0]))
        return machine(x, ab, labels)

    noise = sf.sampling.initial_noise(2, (1, 6, 6), seeds=[0, 1])
    y = torch.tensor([0, 1])
    pulse = sf.sampling.Guidance(scale=3.0, step_min=2, step_max=3)
    got = sf.sampling.sample(recording, noise, steps=6, labels=y, guidance=pulse)
    sched = sf.schedules.get_schedule("cosine")
    grid = sf.sampling.default_grid(sched, 6, "ddim")
    lo, hi = pulse.alpha_bar_window(sched, grid)
    calls = seen[::2]                                                   # guided() calls cond, then uncond
    assert [i for i, a in enumerate(calls) if lo <= a <= hi] == [2, 3]
    assert torch.isfinite(got).all()
