"""Gradients and Jacobian-vector products through every machine, against float64 central finite differences.

An input that requires grad takes the differentiable route (every fold in float64 pure torch), so the exact
posterior mean is differentiated; finite differences of the float64 machine are the independent check."""
import pytest
import torch

import scorefield as sf

CASES = [("is", {}), ("es", {}), ("ls", dict(patch_size=3)), ("els", dict(patch_size=3)),
         ("els", dict(patch_size=5, cross_term="gemm")), ("bbels", dict(patch_size=3)),
         ("els", dict(patch_size=3, conditional=True)), ("tanh", dict(patch_size=3)),
         ("dictionary", dict(patch_size=3)), ("gaussian", {})]


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return sf.data.ImageSet(torch.rand(5, 1, 6, 6, generator=gen) * 2 - 1, labels=torch.arange(5) % 2, name="g")


def _finite_difference_jvp(f, x, v, h=1e-6):
    with torch.no_grad():
        return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jvp_and_vjp_match_finite_differences(name, options, dtype):
    data = _data()
    kwargs = {} if name in ("tanh", "gaussian") else {"dtype": dtype}
    model = sf.models.make(name, data, **kwargs, **options)
    reference = sf.models.make(name, data, **({} if name in ("tanh", "gaussian") else {"dtype": "float64"}),
                               **options)
    labels = torch.tensor([0, 1]) if options.get("conditional") else None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    ab = torch.tensor([0.4, 0.8], dtype=torch.float64)

    def f(y):
        return model(y, ab, labels)

    expected = _finite_difference_jvp(lambda y: reference(y, ab, labels), x, v)
    assert expected.abs().max() > 1e-3                         # the Jacobian is not trivially zero here
    _, jvp = torch.autograd.functional.jvp(f, x.clone().requires_grad_(True), v)
    torch.testing.assert_close(jvp, expected, rtol=1e-5, atol=1e-6)
    # vector-Jacobian product: <u, J v> = <Jᵀ u, v>
    u = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((f(xg) * u).sum(), xg)
    torch.testing.assert_close((grad * v).sum(), (u * expected).sum(), rtol=1e-5, atol=1e-6)


def test_gradient_of_a_float32_input_is_float32_and_no_grad_calls_are_unchanged():
    data = _data()
    model = sf.models.make("els", data, patch_size=3)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    ab = torch.tensor([0.5, 0.9])
    xg = x.clone().requires_grad_(True)
    out = model(xg, ab)
    (grad,) = torch.autograd.grad(out.sum(), xg)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert model.engines.get(None)[0].last_stats["fold"] == "autograd"
    with torch.no_grad():
        plain = model(xg, ab)
    assert model.engines.get(None)[0].last_stats["fold"] != "autograd"
    torch.testing.assert_close(out.detach(), plain, rtol=1e-4, atol=1e-5)


def test_differentiable_call_refuses_what_would_not_fit():
    data = _data()
    model = sf.models.make("els", data, patch_size=3, memory_budget=2**12)
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    with pytest.raises(ValueError, match="backward pass"):
        model(x, 0.5)
