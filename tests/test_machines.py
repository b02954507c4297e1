"""The analytic machines against the exact answers of kamb-ganguli, the EFT paper and the criticality paper."""
import math

import pytest
import torch

import scorefield as sf
from scorefield.models import machines
from scorefield.schedules import CosineSchedule


def ddim(model, x, steps=20, labels=None):
    """Deterministic DDIM on the uniform cosine grid t = 1 → 0 (a local loop, independent of sf.sampling)."""
    sched = CosineSchedule()
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        ab, ab_next = float(sched.alpha_bar(ts[i])), float(sched.alpha_bar(ts[i + 1]))
        x0 = model(x, torch.full((x.shape[0],), ab), labels)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        x = math.sqrt(ab_next) * x0 + math.sqrt(max(1 - ab_next, 0.0)) * eps
    return x


def _data(n=4, c=1, h=5, w=5, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    return sf.data.ImageSet(torch.rand(n, c, h, w, generator=g) * 2 - 1, labels=labels, name="t")


def _noisy(b, c, h, w, seed=1):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_all_machines_are_registered():
    for name in ("is", "es", "ls", "els", "bbels", "tanh", "dictionary"):
        assert name in sf.models.available_models()


def test_els_with_whole_image_patch_is_es():
    data = _data(n=3, c=2, h=5, w=5)
    x, ab = _noisy(3, 2, 5, 5), torch.tensor([0.2, 0.8, 0.97])
    els = sf.models.make("els", data, patch_size=5, padding="circular", dtype=torch.float64)
    es = sf.models.make("es", data, dtype=torch.float64)
    assert torch.allclose(els(x.double(), ab), es(x.double(), ab), atol=1e-10)


def test_ls_covering_the_image_is_is():
    data = _data(n=4, c=1, h=5, w=5)
    x, ab = _noisy(3, 1, 5, 5), torch.tensor([0.1, 0.7, 0.99])
    ls = sf.models.make("ls", data, patch_size=9, padding="zeros", dtype=torch.float64)
    ideal = sf.models.make("is", data, dtype=torch.float64)
    assert torch.allclose(ls(x.double(), ab), ideal(x.double(), ab), atol=1e-10)


def _two_state(h=7, w=7, c=1):
    return sf.data.ImageSet(torch.stack([torch.ones(c, h, w), -torch.ones(c, h, w)]), name="pm1")


@pytest.mark.parametrize("patch", [3, 5])
def test_els_on_two_state_data_is_the_tanh_closed_form(patch):
    data = _two_state()
    x = _noisy(4, 1, 7, 7)
    ab = torch.tensor([0.05, 0.3, 0.7, 0.95])
    els = sf.models.make("els", data, patch_size=patch, padding="circular", dtype=torch.float64)
    closed = sf.models.make("tanh", data, patch_size=patch, padding="circular")
    assert torch.allclose(els(x.double(), ab), closed(x.double(), ab), atol=1e-10)
    bb = sf.models.make("bbels", data, patch_size=patch, padding="zeros", dtype=torch.float64)
    closed0 = sf.models.make("tanh", data, patch_size=patch, padding="zeros")
    assert torch.allclose(bb(x.double(), ab), closed0(x.double(), ab), atol=1e-10)


def test_tanh_formula_directly():
    x = _noisy(1, 1, 6, 6)
    ab = 0.6
    out = sf.models.make("tanh", _two_state(6, 6), patch_size=3, padding="circular")(x, ab)
    s = sum(x.roll((dy, dx), (2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert torch.allclose(out, torch.tanh(math.sqrt(ab) * s / (1 - ab)), atol=1e-6)


def test_is_at_low_noise_returns_the_nearest_training_image():
    data = _data(n=6, c=1, h=6, w=6)
    x = data.images[[4, 1]] + 0.05 * _noisy(2, 1, 6, 6)
    out = sf.models.make("is", data)(x, 0.9999)
    assert torch.allclose(out, data.images[[4, 1]], atol=1e-5)


def test_is_sampling_ends_on_a_training_image():
    data = _data(n=5, c=1, h=6, w=6)
    samples = ddim(sf.models.make("is", data), _noisy(8, 1, 6, 6, seed=5), steps=20)
    rms = ((samples[:, None] - data.images[None]) ** 2).mean((2, 3, 4)).sqrt().min(1).values   # [8]
    assert (rms < 1e-3).all(), rms


def test_float32_machines_match_float64_including_conditional():
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    data = _data(n=6, c=3, h=7, w=7, labels=labels)
    clean = _data(n=4, c=3, h=7, w=7, seed=3).images
    ab = torch.tensor([0.3, 0.9, 0.999, 0.9999])
    x = (ab.sqrt()[:, None, None, None] * clean + (1 - ab).sqrt()[:, None, None, None] * _noisy(4, 3, 7, 7))
    lab = torch.tensor([2, 0, 1, 0])
    for name, padding in [("els", "circular"), ("bbels", "zeros"), ("ls", "zeros"), ("ls", "circular")]:
        fast = sf.models.make(name, data, patch_size=5, padding=padding, conditional=True)
        ref = sf.models.make(name, data, patch_size=5, padding=padding, conditional=True, dtype="float64")
        err = (fast(x, ab, lab).double() - ref(x.double(), ab, lab)).abs().max()
        assert err < 1e-4, (name, padding, err)


def test_conditional_uses_only_the_label_images():
    labels = torch.tensor([0, 1, 0, 1])
    data = _data(n=4, c=1, h=5, w=5, labels=labels)
    model = sf.models.make("els", data, patch_size=3, padding="circular", conditional=True)
    x = _noisy(3, 1, 5, 5)
    _, prov = model.denoise_with_provenance(x, torch.tensor([0.5, 0.5, 0.99]), torch.tensor([1, 0, 1]))
    assert set(labels[prov[0, ..., 0].reshape(-1)].tolist()) == {1}
    assert set(labels[prov[1, ..., 0].reshape(-1)].tolist()) == {0}
    # the class-conditional output is the unconditional machine on that class's images
    sub = sf.models.make("els", data.of_class(1), patch_size=3, padding="circular", dtype="float64")
    cond = sf.models.make("els", data, patch_size=3, padding="circular", conditional=True, dtype="float64")
    assert torch.allclose(cond(x.double(), 0.6, torch.tensor([1, 1, 1])), sub(x.double(), 0.6), atol=1e-12)
    # labels=None asks a conditional machine for the unconditional one: the machine over every class
    everyone = sf.models.make("els", data, patch_size=3, padding="circular", dtype="float64")
    assert torch.allclose(cond(x.double(), 0.6), everyone(x.double(), 0.6), atol=1e-12)


def test_per_sample_alpha_bar_equals_separate_calls():
    data = _data(n=4, c=1, h=6, w=6)
    x, ab = _noisy(3, 1, 6, 6), torch.tensor([0.1, 0.6, 0.99])
    for name, opts in [("bbels", dict(patch_size=3)), ("is", {}), ("es", {}), ("ls", dict(patch_size=3))]:
        model = sf.models.make(name, data, dtype="float64", **opts)
        batch = model(x.double(), ab)
        for i in range(3):
            assert torch.allclose(batch[i:i + 1], model(x[i:i + 1].double(), ab[i:i + 1]), atol=1e-12)


def test_zero_padded_els_is_refused_with_a_pointer_to_bbels():
    with pytest.raises(ValueError, match="bbels"):
        sf.models.make("els", _data(), patch_size=3, padding="zeros")
    with pytest.raises(ValueError, match="els"):
        sf.models.make("bbels", _data(), patch_size=3, padding="circular")
    with pytest.raises(ValueError, match="patch_size"):
        sf.models.make("ls", _data())
    with pytest.raises(ValueError, match="labels"):
        sf.models.make("els", _data(), patch_size=3, conditional=True)


def test_calibrated_schedule_reads_step_i_at_index_i_minus_1():
    sizes = [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15]
    fn = machines.calibrated_patch_schedule(sizes)
    sched = CosineSchedule()
    for i in range(1, 21):
        assert fn(float(sched.alpha_bar(torch.tensor(i / 20)))) == sizes[i - 1]
    assert fn(1.0) == 3 and fn(0.0) == 15


def test_multiscale_machine_equals_fixed_size_machines():
    data = _data(n=3, c=1, h=7, w=7)
    x = _noisy(2, 1, 7, 7)
    ab = torch.tensor([0.95, 0.2])
    multi = sf.models.make("bbels", data, patch_size=[(0.5, 3), (0.0, 5)], dtype="float64")
    out = multi(x.double(), ab)
    for i, p in enumerate((3, 5)):
        fixed = sf.models.make("bbels", data, patch_size=p, dtype="float64")(x[i:i + 1].double(), ab[i:i + 1])
        assert torch.allclose(out[i:i + 1], fixed, atol=1e-12)
    by_fn = sf.models.make("bbels", data, patch_size=lambda a: 3 if a > 0.5 else 5, dtype="float64")
    assert torch.allclose(by_fn(x.double(), ab), out, atol=1e-12)


def test_dictionary_model_with_uniform_patterns_is_tanh_on_any_lattice():
    patterns = torch.stack([torch.ones(5, 5), -torch.ones(5, 5)])
    model = sf.models.make("dictionary", _two_state(7, 7), patterns=patterns, priors=torch.tensor([0.5, 0.5]),
                           dtype="float64")
    x = _noisy(2, 1, 12, 10)                                    # a lattice of another size
    closed = sf.models.make("tanh", _two_state(7, 7), patch_size=5, padding="circular")
    assert torch.allclose(model(x.double(), torch.tensor([0.3, 0.9])), closed(x.double(), torch.tensor([0.3, 0.9])),
                          atol=1e-10)


def test_dictionary_priors_tilt_the_posterior():
    # App. E.4 eq. 54–56 by hand for a 3-pattern dictionary at one site
    g = torch.Generator().manual_seed(0)
    patterns = torch.sign(torch.rand(3, 3, 3, generator=g) - 0.5)
    priors = torch.tensor([0.7, 0.2, 0.1])
    model = sf.models.make("dictionary", _data(h=4, w=4), patterns=patterns, priors=priors, dtype="float64")
    x = torch.randn(1, 1, 4, 4, generator=g).double()
    ab = 0.4
    a, s2 = math.sqrt(ab), 1 - ab
    y = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular")[0, 0, 1:4, 2:5]       # site (1, 2)
    logit = torch.log(priors.double()) + a / s2 * (patterns.double() * y).sum((1, 2))
    expected = (torch.softmax(logit, 0) * patterns[:, 1, 1].double()).sum()
    assert model(x, ab)[0, 0, 1, 2].item() == pytest.approx(expected.item(), abs=1e-10)


def test_dictionary_from_data_is_els():
    data = _data(n=3, c=1, h=6, w=6)
    x = _noisy(2, 1, 6, 6)
    d = sf.models.make("dictionary", data, patch_size=3, dtype="float64")
    els = sf.models.make("els", data, patch_size=3, dtype="float64")
    assert torch.allclose(d(x.double(), 0.8), els(x.double(), 0.8), atol=1e-12)
