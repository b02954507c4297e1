"""Device-agnostic machines, tested without a GPU: every tensor the engine allocates follows its input's device.

With `torch.set_default_device("meta")`, any factory call that forgets `device=` makes a meta tensor, and the
first operation mixing it with the CPU input fails: a call that still returns the right CPU answer allocated
nothing on a device other than its input's. The CUDA comparisons themselves live in test_gpu.py."""
import pytest
import torch

import scorefield as sf

CASES = [("is", {}), ("es", {}), ("ls", dict(patch_size=3)), ("els", dict(patch_size=3)),
         ("els", dict(patch_size=7, cross_term="box")), ("els", dict(patch_size=5, cross_term="gemm", prune=True)),
         ("els", dict(patch_size=5, cache=False)), ("bbels", dict(patch_size=3)), ("tanh", dict(patch_size=3)),
         ("dictionary", dict(patch_size=3)), ("gaussian", {}), ("els", dict(patch_size=3, dtype="float64")),
         ("els", dict(patch_size=3, conditional=True)), ("es", dict(dtype="float64"))]


def _data():
    gen = torch.Generator().manual_seed(0)
    return sf.data.ImageSet(torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1, labels=torch.arange(6) % 2, name="d")


@pytest.fixture
def meta_default():
    torch.set_default_device("meta")
    yield
    torch.set_default_device(None)


def _inputs(conditional):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    ab = torch.tensor([0.1, 0.5, 0.9])
    return x, ab, (torch.tensor([0, 1, 0]) if conditional else None)


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_nothing_is_allocated_on_the_default_device(name, options):
    x, ab, labels = _inputs(options.get("conditional"))
    expected = sf.models.make(name, _data(), **options)(x, ab, labels)
    model = sf.models.make(name, _data(), **options)   # fresh: its banks are built inside the meta context
    torch.set_default_device("meta")
    try:
        got = model(x, ab, labels)
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg, ab, labels).sum(), xg)
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu" and grad.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)   # the thread count may change the sum order
    assert torch.isfinite(grad).all()


def test_make_places_the_machine_and_to_moves_its_banks():
    data = _data()
    model = sf.models.make("els", data, patch_size=3, device="cpu")
    x, ab, _ = _inputs(False)
    before = model(x, ab)
    engine = model.engines.get(None)[0]
    model.to("cpu")                                            # where it already is: nothing changes
    assert model.engines.get(None)[0] is engine and engine.images.device.type == "cpu"
    torch.testing.assert_close(model(x, ab), before, rtol=0, atol=1e-6)
    model.to("meta")                                           # a device without data shows what moved
    assert engine.images.device.type == "meta" and engine.log_weights.device.type == "meta"
    image_machine = sf.models.make("is", data).to("meta")
    assert image_machine.images.get(None)[0].device.type == "meta"
    placed = sf.models.make("bbels", data, patch_size=3, device="meta")
    assert placed.engines.device.type == "meta"


def test_a_bad_device_is_refused_by_name():
    with pytest.raises(ValueError, match="device"):
        sf.models.make("els", _data(), patch_size=3, device="warp-drive")


def test_a_plan_larger_than_the_free_memory_is_refused(monkeypatch):
    from scorefield.engine import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 1024)
    model = sf.models.make("els", _data(), patch_size=3, cross_term="gemm")
    x, ab, _ = _inputs(False)
    with pytest.raises(ValueError, match="MiB free"):
        model(x, ab)


def test_free_memory_of_the_cpu_is_known():
    from scorefield.engine.memory import free_bytes

    free = free_bytes("cpu")
    assert free is None or free > 2**20


def test_engine_progress_bars_follow_one_switch(capsys, monkeypatch):
    from scorefield.engine import posterior, progress

    monkeypatch.setattr(posterior, "PROGRESS_PAIRS", 0)           # every fold would show a bar
    model = sf.models.make("els", _data(), patch_size=3, cross_term="gemm", cache=False)
    x, ab, _ = _inputs(False)
    progress.set_progress(False)
    try:
        model(x, ab)
    finally:
        progress.set_progress(True)
    assert "patch posterior" not in capsys.readouterr().err
    model(x, ab)
    assert "patch posterior" in capsys.readouterr().err
