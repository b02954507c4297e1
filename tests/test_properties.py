"""Property-based tests (hypothesis) of the machines against a brute-force float64 posterior written here.

Random image sizes (odd and even), channels 1–3, patch sizes, both paddings, class subsets, ᾱ from 1e-4 to
1 − 1e-6 and dataset sizes that do not divide the chunk size. The brute force enumerates every (training
image, bank location) pair allowed for each query pixel and takes the softmax of −‖q − √ᾱ·k‖² / 2(1−ᾱ)
(kamb-ganguli eq. 3, 7, 9, 41) in float64.

Tolerance. The machines run in float32. Their log-weights are (a/s²)·q·k − (a²/2s²)·‖k‖² with a = √ᾱ and
s² = 1 − ᾱ; an error δ in the log-weights moves the posterior mean of values in [−1, 1] by at most 2·δ. So we
compare the float32 machines with TOL(ᾱ, D) = 2·ε₃₂·(D + a·D)·(a/s²)·4 + 1e-5, floored at 1e-4 — the bound that
rounding of a D-term float32 dot product of entries ≤ 2 in magnitude gives — and the float64 machines (the
same code in float64) with 1e-9 at every ᾱ. ε₃₂ = 2⁻²³.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import scorefield as sf  # noqa: E402

EPS32 = 2.0 ** -23
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
LONG = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tolerance(alpha_bar: float, dim: int) -> float:
    a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
    return max(1e-4, 2 * EPS32 * (dim + a * dim) * (a / s2) * 4 + 1e-5)


# ---- the brute force ---------------------------------------------------------------------------------------

def _patches(images: torch.Tensor, p: int, padding: str) -> torch.Tensor:
    """[N, C, H, W] -> [N, H·W, C·p·p] (each pixel's patch, zero or circular padding)."""
    r = p // 2
    h, w = images.shape[-2:]
    if padding == "circular":               # by index arithmetic: a patch may wrap around more than once
        rows, cols = torch.arange(-r, h + r) % h, torch.arange(-r, w + r) % w
        padded = images[..., rows, :][..., cols]
    else:
        padded = F.pad(images, (r, r, r, r))
    return F.unfold(padded, p).transpose(1, 2)


def _border_class(h: int, w: int, r: int) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cls = torch.stack([i.clamp(max=r), (h - 1 - i).clamp(max=r), j.clamp(max=r), (w - 1 - j).clamp(max=r)], -1)
    return cls.reshape(h * w, 4)


def allowed_pairs(kind: str, h: int, w: int, p: int) -> torch.Tensor:
    """[H·W query, H·W bank] True where a query pixel may use a bank location."""
    hw = h * w
    if kind == "ls":
        return torch.eye(hw, dtype=torch.bool)
    if kind == "els":
        return torch.ones(hw, hw, dtype=torch.bool)
    if kind == "bbels":
        cls = _border_class(h, w, p // 2)
        return (cls[:, None, :] == cls[None, :, :]).all(-1)
    raise ValueError(kind)


def brute_force(kind: str, train: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, p: int = 1,
                padding: str = "zeros") -> torch.Tensor:
    """The posterior mean x̂₀ [B, C, H, W] by enumeration, in float64."""
    train, x, alpha_bar = train.double(), x.double(), alpha_bar.double()
    B, C, H, W = x.shape
    a, s2 = alpha_bar.sqrt(), 1 - alpha_bar
    if kind == "is":
        d2 = ((x[:, None] - a[:, None, None, None, None] * train[None]) ** 2).flatten(2).sum(-1)   # [B, N]
        w = torch.softmax(-d2 / (2 * s2[:, None]), dim=1)
        return torch.einsum("bn,nchw->bchw", w, train)
    q, k = _patches(x, p, padding), _patches(train, p, padding)             # [B, HW, D], [N, HW, D]
    centre = train.flatten(2).transpose(1, 2)                              # [N, HW, C]
    d2 = ((q[:, :, None, None, :] - a[:, None, None, None, None] * k[None, None]) ** 2).sum(-1)  # [B, HW, N, HW]
    logit = -d2 / (2 * s2[:, None, None, None])
    logit = logit.masked_fill(~allowed_pairs(kind, H, W, p)[None, :, None, :], -math.inf)
    w = torch.softmax(logit.flatten(2), dim=2).reshape(logit.shape)
    out = torch.einsum("blnm,nmc->blc", w, centre)                          # [B, HW, C]
    return out.transpose(1, 2).reshape(B, C, H, W)


# ---- the strategies ----------------------------------------------------------------------------------------

@st.composite
def problems(draw, kinds=("is", "ls", "els", "bbels")):
    kind = draw(st.sampled_from(kinds))
    h, w = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    c = draw(st.integers(1, 3))
    n = draw(st.integers(1, 7))
    p = draw(st.sampled_from([q for q in (1, 3, 5, 7) if q <= 2 * max(h, w) - 1]))
    padding = {"els": "circular", "bbels": "zeros", "is": None}.get(kind) or draw(st.sampled_from(["zeros",
                                                                                                    "circular"]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_noise = draw(st.floats(math.log(1e-6), math.log(1 - 1e-4)))     # 1 − ᾱ from 1e-6 to 1 − 1e-4
    return kind, h, w, c, n, p, padding, seed, 1 - math.exp(log_noise)


def _instance(h, w, c, n, seed, alpha_bar, batch=2):
    g = torch.Generator().manual_seed(seed)
    train = (torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1).float().double()  # as stored
    clean = torch.rand(batch, c, h, w, generator=g, dtype=torch.float64) * 2 - 1
    ab = torch.full((batch,), alpha_bar, dtype=torch.float64)
    x = ab.sqrt()[:, None, None, None] * clean + (1 - ab).sqrt()[:, None, None, None] * torch.randn(
        batch, c, h, w, generator=g, dtype=torch.float64)
    return train, x, ab


def _machine(kind, train, p, padding, **options):
    data = sf.data.ImageSet(train.float(), name="prop")
    if kind == "is":
        return sf.models.make("is", data, **options)
    return sf.models.make(kind, data, patch_size=p, padding=padding, **options)


def _check_against_brute_force(problem, chunk_images=None):
    kind, h, w, c, n, p, padding, seed, alpha_bar = problem
    train, x, ab = _instance(h, w, c, n, seed, alpha_bar)
    exact = brute_force(kind, train, x, ab, p, padding or "zeros")
    options = {} if chunk_images is None else {"chunk_images": chunk_images}
    fast = _machine(kind, train, p, padding, **options)(x.float(), ab.float())
    assert torch.isfinite(fast).all()
    dim = c * (h * w if kind == "is" else p * p)
    err = (fast.double() - exact).abs().max().item()
    assert err <= tolerance(alpha_bar, dim), (problem, err, tolerance(alpha_bar, dim))
    ref64 = _machine(kind, train, p, padding, dtype="float64", **options)(x, ab)
    assert (ref64 - exact).abs().max().item() <= 1e-9, problem


@FAST
@given(problems(), st.sampled_from([None, 1, 2, 3]))
def test_machines_equal_the_brute_force_posterior(problem, chunk_images):
    _check_against_brute_force(problem, chunk_images)


@pytest.mark.slow
@LONG
@given(problems(), st.sampled_from([None, 1, 2, 3]))
def test_machines_equal_the_brute_force_posterior_long(problem, chunk_images):
    _check_against_brute_force(problem, chunk_images)


@FAST
@given(problems(), st.randoms(use_true_random=False))
def test_permuting_or_duplicating_the_training_set_changes_nothing(problem, rng):
    kind, h, w, c, n, p, padding, seed, alpha_bar = problem
    train, x, ab = _instance(h, w, c, n, seed, alpha_bar)
    base = _machine(kind, train, p, padding, dtype="float64")(x, ab)
    order = list(range(n))
    rng.shuffle(order)
    permuted = _machine(kind, train[order], p, padding, dtype="float64")(x, ab)
    doubled = _machine(kind, torch.cat([train, train]), p, padding, dtype="float64")(x, ab)
    assert (permuted - base).abs().max() <= 1e-10
    assert (doubled - base).abs().max() <= 1e-10


@FAST
@given(problems(kinds=("is", "ls", "els", "bbels")), st.integers(2, 3))
def test_a_conditional_machine_is_the_machine_of_its_class(problem, classes):
    kind, h, w, c, n, p, padding, seed, alpha_bar = problem
    train, x, ab = _instance(h, w, c, max(n, classes), seed, alpha_bar)
    labels = torch.arange(len(train)) % classes
    data = sf.data.ImageSet(train, labels=labels, name="prop")
    options = {} if kind == "is" else {"patch_size": p, "padding": padding}
    conditional = sf.models.make(kind, data, conditional=True, dtype="float64", **options)
    y = torch.tensor([0, classes - 1])
    out = conditional(x, ab, y)
    for i in range(2):
        own = sf.models.make(kind, sf.data.ImageSet(train[labels == y[i]], name="one"), dtype="float64", **options)
        assert (out[i:i + 1] - own(x[i:i + 1], ab[i:i + 1])).abs().max() <= 1e-10
