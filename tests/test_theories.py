"""The field's other analytic theories (models/theories): each against a float64 brute force on tiny data."""
import math

import pytest
import torch

import scorefield as sf
from scorefield.models import ModelConfigError
from scorefield.models.theories.neighbours import exact_search
from scorefield.models.theories.pspc import CIFAR_PATCH_SCHEDULE, SizeSchedule, size_schedule

THEORIES = ["wiener", "pca-locality", "cfdm", "pspc", "topk", "nearest"]
F64 = torch.float64


def tiny(n=14, c=2, h=4, w=5, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, h, w, generator=g) * 2 - 1
    smooth = 0.5 * (base + torch.roll(base, 1, dims=-1))          # correlated pixels: nontrivial masks
    lab = torch.arange(n) % 3 if labels else None
    return sf.data.ImageSet(smooth.clamp(-1, 1), labels=lab, name="tiny")


def noisy(data, ab, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = data.images[torch.randint(len(data), (len(ab),), generator=g)].double()
    ab = torch.as_tensor(ab, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    return ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * eps, ab


def brute_is(x, ab, images, temperature=1.0):
    """Σ_j softmax_j(−‖x − √ᾱ y_j‖² / (2(1−ᾱ)T)) y_j in float64, one sample at a time."""
    y = images.reshape(images.shape[0], -1).double()
    out = []
    for b in range(x.shape[0]):
        d = ((x[b].reshape(-1).double() - ab[b].sqrt() * y) ** 2).sum(1)
        w = torch.softmax(-d / (2 * (1 - ab[b]) * temperature), 0)
        out.append(w @ y)
    return torch.stack(out).reshape(x.shape)


AB = [0.05, 0.3, 0.7, 0.95, 0.999]


# ---- registry ---------------------------------------------------------------------------------------------------

def test_every_theory_is_registered_and_answers_the_one_call():
    data = tiny()
    x, ab = noisy(data, AB)
    for name in THEORIES:
        assert name in sf.models.available_models()
        model = sf.models.make(name, data)
        out = model(x.float(), ab.float())
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all(), name
        assert model.config["name"] == name
        sf.runs.jsonable(model.config)                 # plain data: it goes into run configs


# ---- Wiener ------------------------------------------------------------------------------------------------------

def gaussian_posterior(x, ab, images):
    """μ + Cov(x0, x) Var(x)⁻¹ (x − aμ) by a linear solve, with the empirical mean and covariance."""
    flat = images.reshape(images.shape[0], -1).double()
    mu, cov = flat.mean(0), torch.cov(flat.T)
    out = []
    for b in range(x.shape[0]):
        a = ab[b].sqrt()
        var_x = a * a * cov + (1 - ab[b]) * torch.eye(len(mu), dtype=F64)
        out.append(mu + a * cov @ torch.linalg.solve(var_x, x[b].reshape(-1) - a * mu))
    return torch.stack(out).reshape(x.shape)


def test_wiener_is_the_gaussian_model_and_its_class_conditional_form_uses_each_class():
    data = tiny(n=24)
    x, ab = noisy(data, [0.1, 0.5, 0.9, 0.99, 0.3, 0.7])
    plain = sf.models.make("wiener", data)
    assert torch.equal(plain(x, ab), sf.models.make("gaussian", data)(x, ab))
    torch.testing.assert_close(plain(x, ab), gaussian_posterior(x, ab, data.images), atol=1e-9, rtol=0)
    cond = sf.models.make("wiener", data, conditional=True)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    got = cond(x, ab, labels)
    for b, lab in enumerate(labels.tolist()):
        ref = gaussian_posterior(x[b:b + 1], ab[b:b + 1], data.images[data.labels == lab])
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(cond(x, ab), plain(x, ab), atol=1e-12, rtol=0)   # no labels: all images
    with pytest.raises(ModelConfigError, match="labelled"):
        sf.models.make("wiener", tiny(labels=False), conditional=True)


# ---- PCA-locality ---------------------------------------------------------------------------------------------

def studio_masks(images, ab, tau):
    """The released code's matrix: W = Σ(Σ + σ²I)⁻¹ by a solve, rows ÷ diagonal, |·| ≥ τ·max (as used in
    einsum('bkn,nm->bkm'): column m is pixel m's mask)."""
    flat = images.reshape(images.shape[0], -1).double()
    cov = torch.cov(flat.T)
    sigma2 = (1 - ab) / ab
    w = torch.linalg.solve(cov + sigma2 * torch.eye(cov.shape[0], dtype=F64), cov).T     # Σ(Σ+σ²I)⁻¹
    diag = torch.diagonal(w).clone()
    diag[diag.abs() < 1e-6] = 1
    m = (w / diag[:, None]).abs()
    return (m >= tau * m.max()).double()


def brute_pca_locality(x, ab, images, tau, temperature=1.0, convention="studio"):
    """The released code's dense pass with one global softmax, float64, one noise level at a time."""
    y = images.reshape(images.shape[0], -1).double()
    out = []
    for b in range(x.shape[0]):
        mask = studio_masks(images, float(ab[b]), tau)
        if convention == "row":
            mask = mask.T
        delta = (x[b].reshape(1, -1).double() - ab[b].sqrt() * y) ** 2                 # [N, D]
        logits = -(delta @ mask) / (2 * (1 - ab[b]) * temperature)                      # [N, D]
        out.append((torch.softmax(logits, 0) * y).sum(0))
    return torch.stack(out).reshape(x.shape)


def test_pca_locality_masks_are_the_released_codes():
    data = tiny()
    model = sf.models.make("pca-locality", data, tau=0.05)
    for ab in (0.2, 0.6, 0.95):
        ref = studio_masks(data.images, ab, 0.05).T.bool()            # row m = pixel m's mask
        got = model.masks(ab)
        assert torch.equal(got, ref), ab
        assert 0 < got.sum() < got.numel()                             # neither empty nor everything


@pytest.mark.parametrize("tau,temperature,convention", [(0.02, 1.0, "studio"), (0.05, 1.0, "studio"),
                                                        (0.1, 0.5, "studio"), (0.05, 2.0, "row")])
def test_pca_locality_equals_brute_force(tau, temperature, convention):
    data = tiny()
    x, ab = noisy(data, AB)
    ref = brute_pca_locality(x, ab, data.images, tau, temperature, convention)
    for route in ("sparse", "dense", "auto"):
        for dtype, atol in (("float64", 1e-10), ("float32", 2e-5)):
            model = sf.models.make("pca-locality", data, tau=tau, temperature=temperature, convention=convention,
                                   dtype=dtype, route=route)
            torch.testing.assert_close(model(x, ab), ref, atol=atol, rtol=0)
            assert all(e["cross_term"] != "pca-locality/auto" for e in model.engine_log())
    chunked = sf.models.make("pca-locality", data, tau=tau, temperature=temperature, convention=convention,
                             dtype="float64", memory_budget=5e4)           # a few training images per chunk
    torch.testing.assert_close(chunked(x, ab), ref, atol=1e-10, rtol=0)


def test_pca_locality_conditional_uses_each_class_statistics_and_images():
    data = tiny(n=24)
    x, ab = noisy(data, [0.3, 0.8, 0.5])
    labels = torch.tensor([2, 0, 2])
    got = sf.models.make("pca-locality", data, conditional=True, dtype="float64")(x, ab, labels)
    for b, lab in enumerate(labels.tolist()):
        ref = brute_pca_locality(x[b:b + 1], ab[b:b + 1], data.images[data.labels == lab], 0.02)
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-10, rtol=0)


def test_pca_locality_refuses_a_zero_threshold():
    with pytest.raises(ModelConfigError, match="tau"):
        sf.models.make("pca-locality", tiny(), tau=0)
    with pytest.raises(ModelConfigError, match="convention"):
        sf.models.make("pca-locality", tiny(), convention="columns")
    with pytest.raises(ModelConfigError, match="route"):
        sf.models.make("pca-locality", tiny(), route="gather")


# ---- smoothed CFDM ------------------------------------------------------------------------------------------------

def test_cfdm_is_the_average_of_the_ideal_denoiser_over_its_perturbations():
    data = tiny()
    x, ab = noisy(data, AB)
    model = sf.models.make("cfdm", data, num_noise=4, smoothing_std=0.3, dtype="float64")
    eps = model.perturbations(x, ab)                                               # [B, M, C, H, W]
    assert eps.shape == (5, 4, *x.shape[1:])
    ref = torch.stack([brute_is(x + 0.3 * eps[:, i], ab, data.images) for i in range(4)]).mean(0)
    torch.testing.assert_close(model(x, ab), ref, atol=1e-10, rtol=0)
    hot = sf.models.make("cfdm", data, num_noise=3, smoothing_std=0.0, temperature=3.0, dtype="float64")
    torch.testing.assert_close(hot(x, ab), brute_is(x, ab, data.images, temperature=3.0), atol=1e-10, rtol=0)


def test_cfdm_draws_are_per_sample_whatever_the_batch():
    data = tiny()
    x, ab = noisy(data, AB)
    model = sf.models.make("cfdm", data, num_noise=3, smoothing_std=0.5, dtype="float64")
    full = model(x, ab)
    eps = model.perturbations(x, ab)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(model.perturbations(x[perm], ab[perm]), eps[perm])
    for b in range(5):                                  # alone, and in a batch of other samples
        assert torch.equal(model.perturbations(x[b:b + 1], ab[b:b + 1])[0], eps[b])
        torch.testing.assert_close(model(x[b:b + 1], ab[b:b + 1]), full[b:b + 1], atol=1e-12, rtol=0)
    other = sf.models.make("cfdm", data, num_noise=3, smoothing_std=0.5, seed=7, dtype="float64")
    assert not torch.equal(other.perturbations(x, ab), eps)


# ---- PSPC ------------------------------------------------------------------------------------------------------

def brute_pspc(x, ab, images, size, flips=False):
    """The reference algorithm: a loop over every patch that fits, each patch set's posterior mean added to the
    composite and a count, float64."""
    if flips:
        images = torch.cat([images, images.flip(-1)])
    _, _, h, w = x.shape
    y = images.double()
    out = torch.zeros_like(x, dtype=F64)
    count = torch.zeros_like(x, dtype=F64)
    for y0 in range(h - size + 1):
        for x0 in range(w - size + 1):
            xs = x[..., y0:y0 + size, x0:x0 + size]
            ys = y[..., y0:y0 + size, x0:x0 + size]
            out[..., y0:y0 + size, x0:x0 + size] += brute_is(xs, ab, ys)
            count[..., y0:y0 + size, x0:x0 + size] += 1
    return out / count


@pytest.mark.parametrize("size,flips", [(1, False), (2, False), (3, True), (4, False)])
def test_pspc_equals_the_per_position_loop(size, flips):
    data = tiny()
    x, ab = noisy(data, AB)
    for dtype, atol in (("float64", 1e-10), ("float32", 2e-5)):
        model = sf.models.make("pspc", data, patch_size=size, flips=flips, dtype=dtype)
        torch.testing.assert_close(model(x, ab), brute_pspc(x, ab, data.images, size, flips), atol=atol, rtol=0)
    streamed = sf.models.make("pspc", data, patch_size=size, flips=flips, dtype="float64", cache=False)
    torch.testing.assert_close(streamed(x, ab), brute_pspc(x, ab, data.images, size, flips), atol=1e-10, rtol=0)


def test_pspc_on_whole_images_is_the_ideal_denoiser_and_sizes_clip_to_the_image():
    data = tiny(h=5, w=5)
    x, ab = noisy(data, AB)
    ideal = brute_is(x, ab, data.images)
    for size in (5, 9):
        got = sf.models.make("pspc", data, patch_size=size, dtype="float64")(x, ab)
        torch.testing.assert_close(got, ideal, atol=1e-10, rtol=0)


def test_pspc_schedules_follow_the_reference_convention():
    cifar = size_schedule("cifar")
    sigmas = sf.schedules.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(CIFAR_PATCH_SCHEDULE) == 18
    for i, sigma in enumerate(sigmas.tolist()):          # at each grid level, its own size
        assert cifar(1 / (1 + sigma**2)) == CIFAR_PATCH_SCHEDULE[i]
    assert cifar(0.0) == 32 and cifar(1.0) == 3
    listed = size_schedule([9, 5, 3])                    # highest noise first on the 3-level EDM grid
    grid = sf.schedules.karras_sigmas(3, 0.002, 80.0, 7.0).tolist()
    assert [listed(1 / (1 + s**2)) for s in grid] == [9, 5, 3] and listed(1 / (1 + 1.8**2)) == 5
    by_ab = size_schedule({"sizes": [3, 7], "alpha_bars": [0.99, 0.1]})
    assert by_ab(0.95) == 3 and by_ab(0.2) == 7
    assert isinstance(size_schedule(SizeSchedule([4], [1.0])), SizeSchedule)
    data = tiny()
    model = sf.models.make("pspc", data, patch_size=[9, 2], dtype="float64")
    x, ab = noisy(data, [1e-4, 0.999])                   # σ ≈ 100 and 0.03: nearest 80 and 0.002
    assert model.patch_size_at(1e-4) == 4 and model.patch_size_at(0.999) == 2      # 9 clips to min(H, W)
    ref = torch.cat([brute_pspc(x[:1], ab[:1], data.images, 4), brute_pspc(x[1:], ab[1:], data.images, 2)])
    torch.testing.assert_close(model(x, ab), ref, atol=1e-10, rtol=0)
    for bad in (0, "imagenet", {"sizes": [3]}, [2.5]):
        with pytest.raises(ModelConfigError):
            sf.models.make("pspc", data, patch_size=bad)


def test_pspc_conditional_uses_each_class():
    data = tiny(n=24)
    x, ab = noisy(data, [0.3, 0.8, 0.5])
    labels = torch.tensor([1, 0, 1])
    got = sf.models.make("pspc", data, patch_size=2, conditional=True, dtype="float64")(x, ab, labels)
    for b, lab in enumerate(labels.tolist()):
        ref = brute_pspc(x[b:b + 1], ab[b:b + 1], data.images[data.labels == lab], 2)
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-10, rtol=0)


# ---- exact top-k and nearest ------------------------------------------------------------------------------------

def test_topk_with_k_equal_to_n_is_the_ideal_denoiser_exactly():
    data = tiny()
    x, ab = noisy(data, AB)
    for dtype in ("float32", "float64"):
        is_model = sf.models.make("is", data, dtype=dtype)
        top = sf.models.make("topk", data, k=len(data), dtype=dtype)
        assert torch.equal(top(x, ab), is_model(x, ab))
        assert torch.equal(top.neglected_bound(), torch.zeros(5, dtype=F64))


def test_exact_search_finds_the_nearest_images_and_bounds_the_rest():
    data = tiny(n=40)
    x, ab = noisy(data, AB)
    flat_x, flat_y = x.reshape(5, -1), data.images.reshape(40, -1)
    a = ab.sqrt()
    d = ((flat_x[:, None, :] - a[:, None, None] * flat_y.double()[None]) ** 2).sum(-1)     # [B, N]
    for k in (1, 5, 39):
        index, dist, d_out, margin = exact_search(flat_x, a, flat_y, k)
        assert (margin > 0).all() and (margin < 1e-10).all()
        ref = torch.sort(d, dim=1)
        assert torch.equal(index, ref.indices[:, :k])
        torch.testing.assert_close(dist, ref.values[:, :k], atol=1e-12, rtol=0)
        assert (d_out <= ref.values[:, k]).all() and (d_out > ref.values[:, k] - 1e-9).all()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_is_the_restricted_posterior_and_its_bound_holds(k):
    data = tiny(n=40)
    x, ab = noisy(data, AB)
    model = sf.models.make("topk", data, k=k, dtype="float64")
    got = model(x, ab)
    bound = model.neglected_bound()
    ideal = brute_is(x, ab, data.images)
    y = data.images.reshape(40, -1).double()
    spread = y.max(0).values - y.min(0).values                                             # [D]
    for b in range(5):
        d = ((x[b].reshape(-1) - ab[b].sqrt() * y) ** 2).sum(1)
        near = torch.argsort(d)[:k]
        w = torch.softmax(-d[near] / (2 * (1 - ab[b])), 0)
        torch.testing.assert_close(got[b].reshape(-1), w @ y[near], atol=1e-10, rtol=0)
        mass = torch.softmax(-d / (2 * (1 - ab[b])), 0)
        neglected = 1 - mass[near].sum()
        assert neglected <= bound[b] * (1 + 1e-9) + 1e-15                                   # a true upper bound
        assert ((got[b].reshape(-1) - ideal[b].reshape(-1)).abs() <= bound[b] * spread + 1e-10).all()
    assert model.last_k.tolist() == [k] * 5
    assert model.engine_log()[-1]["neglected_bound"] == pytest.approx(float(bound.max()))


def test_topk_with_a_tolerance_grows_k_until_it_equals_the_ideal_denoiser():
    data = tiny(n=40)
    x, ab = noisy(data, AB)
    model = sf.models.make("topk", data, k=1, tol=1e-6, dtype="float64")
    got = model(x, ab)
    assert (model.neglected_bound() <= 1e-6).all()
    torch.testing.assert_close(got, brute_is(x, ab, data.images), atol=2e-6, rtol=0)
    assert (model.last_k >= 1).all() and (model.last_k <= 40).all() and model.last_k.max() > 1
    cond = sf.models.make("topk", data, k=2, conditional=True, dtype="float64")
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = cond(x, ab, labels)
    for b, lab in enumerate(labels.tolist()):
        ref = sf.models.make("topk", sf.data.ImageSet(data.images[data.labels == lab]), k=2, dtype="float64")
        torch.testing.assert_close(out[b:b + 1], ref(x[b:b + 1], ab[b:b + 1]), atol=1e-12, rtol=0)
        assert cond.neglected_bound()[b] == ref.neglected_bound()[0]


@pytest.mark.parametrize("metric", ["posterior", "studio"])
def test_nearest_returns_the_nearest_training_image(metric):
    data = tiny(n=40)
    x, ab = noisy(data, AB)
    got = sf.models.make("nearest", data, metric=metric)(x.float(), ab.float())
    y = data.images.reshape(40, -1).double()
    scale = ab.sqrt() if metric == "posterior" else torch.ones(5, dtype=F64)
    for b in range(5):
        j = int(((x[b].reshape(-1) - scale[b] * y) ** 2).sum(1).argmin())
        assert torch.equal(got[b], data.images[j])
    with pytest.raises(ModelConfigError, match="metric"):
        sf.models.make("nearest", data, metric="l1")


def test_bad_options_are_refused():
    data = tiny()
    for name, opts, match in [("topk", {"k": 0}, "k must"), ("topk", {"tol": 1.5}, "tol"),
                              ("cfdm", {"num_noise": 0}, "num_noise"), ("cfdm", {"smoothing_std": -1}, "smoothing"),
                              ("cfdm", {"temperature": 0}, "temperature"), ("pspc", {"cache": "x"}, "cache"),
                              ("wiener", {"conditional": True, "mean": torch.zeros(40)}, "mean")]:
        with pytest.raises(ModelConfigError, match=match):
            sf.models.make(name, data, **opts)


# ---- every theory: batch-independent, conditional without labels = unconditional --------------------------------

@pytest.mark.parametrize("name", THEORIES)
def test_a_sample_does_not_depend_on_its_batch(name):
    data = tiny()
    x, ab = noisy(data, AB)
    model = sf.models.make(name, data, **({} if name in ("wiener", "nearest") else {"dtype": "float64"}))
    full = model(x, ab)
    for b in (0, 3):
        torch.testing.assert_close(model(x[b:b + 1], ab[b:b + 1]), full[b:b + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", THEORIES)
def test_conditional_theory_without_labels_is_the_unconditional_one(name):
    data = tiny()
    x, ab = noisy(data, AB[:3])
    opts = {} if name in ("wiener", "nearest") else {"dtype": "float64"}
    cond = sf.models.make(name, data, conditional=True, **opts)
    plain = sf.models.make(name, data, **opts)
    torch.testing.assert_close(cond(x, ab), plain(x, ab), atol=1e-12, rtol=0)
    assert cond(x, ab, torch.tensor([0, 1, 2])).shape == x.shape
    with pytest.raises(sf.models.DenoiserInputError, match="unconditional"):
        plain(x, ab, torch.tensor([0, 1, 2]))


# ---- in the comparison -----------------------------------------------------------------------------------------

def test_predict_takes_every_theory(tmp_path):
    data = sf.data.load("digits", subset=40, seed=0)
    network = sf.models.make("bbels", data, patch_size=3, padding="zeros")
    res = sf.experiments.predict(network, data, theories=["is", *THEORIES], seeds=range(2), steps=3,
                                 theory_options={"topk": {"k": 5}, "pspc": {"patch_size": 3}},
                                 out=tmp_path, progress=False)
    assert [r["theory"] for r in res.table] == ["is", *THEORIES]
    assert all(math.isfinite(r["r2_median"]) for r in res.table)
    cfg = sf.runs.RunDir.open(res.run_dir).config["theories"]
    assert cfg["topk"]["k"] == 5 and cfg["pspc"]["patch_size"] == 3


def test_predict_command_takes_theories_and_their_options_without_calibrating(tmp_path, capsys):
    from scorefield.cli import main

    common = ["--model", "bbels", "--patch", "3", "--model-padding", "zeros", "--data", "digits", "--subset", "30",
              "--steps", "3", "--out", str(tmp_path), "--no-progress", "--seeds", "2"]
    assert main(["predict", *common, "--theories", "is,wiener,pca-locality,topk,nearest", "--theory-opt",
                 "topk:k=4", "--theory-opt", "pca-locality:tau=0.05", "--name", "p"]) == 0
    out = capsys.readouterr().out
    assert "| topk |" in out and "| pca-locality |" in out and "calibrated" not in out
    cfg = sf.runs.RunDir.open(tmp_path / "p").config["theories"]
    assert cfg["topk"]["k"] == 4 and cfg["pca-locality"]["tau"] == 0.05
    assert not any(p.name.endswith("calibration") for p in tmp_path.iterdir())
    assert main(["predict", *common, "--theories", "is,topk", "--theory-opt", "pspc:patch_size=3"]) == 2
    assert main(["predict", *common, "--theories", "is,topk", "--theory-opt", "k=3"]) == 2
