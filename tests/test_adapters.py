"""Adapters: diffusers UNets and EDM / k-diffusion denoisers as scorefield denoisers, and scorefield denoisers as
k-diffusion models. Every conversion is checked by hand on randomly initialized models (no weights are
downloaded), against diffusers' own scheduler step and against exact Gaussian answers; the diffusers tests skip
where diffusers is absent (the `adapters` extra), the k-diffusion sampler tests where k-diffusion is."""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import scorefield as sf
from scorefield.analysis.receptive_field import receptive_field
from scorefield.models.adapters import AdapterError, from_diffusers, from_edm, to_k_diffusion
from scorefield.models.base import Denoiser, DenoiserInputError
from scorefield.models.gaussian import GaussianDenoiser
from scorefield.models.nets import ALPHA_BAR_FLOOR

pytestmark = pytest.mark.usefixtures("one_thread")

PREDICTIONS = ["epsilon", "sample", "v_prediction"]


# ---- shared pieces -----------------------------------------------------------------------------------------

def tiny_unet(channels: int = 1, size: int = 8, out_channels: int | None = None, seed: int = 0, **kw):
    """A randomly initialized diffusers UNet2DModel of ~40k parameters (built from a config, nothing downloaded)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=out_channels or channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, **kw).eval()


def diagonal_gaussian(shape=(1, 6, 6), seed: int = 0) -> tuple[GaussianDenoiser, torch.Tensor, torch.Tensor]:
    """The exact denoiser of x₀ ~ N(μ, diag(λ)), with μ and λ."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    mu = torch.rand(d, generator=g, dtype=torch.float64) - 0.5
    lam = 0.05 + torch.rand(d, generator=g, dtype=torch.float64)
    return GaussianDenoiser(mu, torch.diag(lam), shape), mu, lam


def ve_gaussian(x_ve: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """E[x₀ | x₀ + σn = x_ve] for x₀ ~ N(μ, diag(λ)): μ + λ/(λ+σ²)·(x_ve − μ), written in EDM's variables."""
    flat = x_ve.reshape(x_ve.shape[0], -1).to(torch.float64)
    s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
    return (mu + lam / (lam + s2) * (flat - mu)).reshape(x_ve.shape)


class ToyEDM(nn.Module):
    """A small random conv net with EDM's preconditioning (Karras et al. 2022, Table 1) and EDMPrecond's
    attributes (img_channels, img_resolution, label_dim; one-hot class_labels)."""

    def __init__(self, channels: int = 1, resolution: int = 8, label_dim: int = 0, sigma_data: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.img_channels, self.img_resolution, self.label_dim, self.sigma_data = channels, resolution, label_dim, \
            sigma_data
        self.conv1 = nn.Conv2d(channels + 1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.label = nn.Linear(max(label_dim, 1), 8)
        self.sigmas_seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.sigmas_seen.append(sigma.detach().clone())
        sigma = sigma.reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        h = torch.cat([c_in * x, c_noise.expand(-1, 1, *x.shape[2:])], 1)
        h = torch.tanh(self.conv1(h))
        if class_labels is not None:
            h = h + self.label(class_labels)[:, :, None, None]
        return c_skip * x + c_out * self.conv2(h)


def random_net(conditional: bool = False, dtype=torch.float64) -> Denoiser:
    g = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, labels=torch.arange(6) % 3, name="toy")
    torch.manual_seed(0)
    return sf.models.make("resnet", data, preset="tiny", conditional=conditional).to(dtype)


def edm_heun(D, x: torch.Tensor, sigmas: torch.Tensor, **extra) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1 with S_churn = 0), as k-diffusion's
    sample_heun writes it: d = (x − D(x, σ))/σ, Euler to the next σ, trapezoidal correction unless it is 0."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, s * s_in, **extra)) / s
        x_next = x + d * (s_next - s)
        if s_next > 0:
            d_next = (x_next - D(x_next, s_next * s_in, **extra)) / s_next
            x_next = x + (d + d_next) / 2 * (s_next - s)
        x = x_next
    return x


def edm_euler(D, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's sample_euler (S_churn = 0): x ← x + (x − D(x, σ))/σ · (σ' − σ)."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        x = x + (x - D(x, sigmas[i] * s_in)) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


# ---- diffusers: ᾱ → timestep --------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_time_input_is_exact_on_the_table_and_linear_in_log_sigma_between(scheduler_name):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, scheduler_name)(beta_schedule="squaredcos_cap_v2")
    model = from_diffusers(tiny_unet(), sched)
    table = sched.alphas_cumprod.to(torch.float64)
    steps = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(model.time_input(table[steps]), steps.to(torch.float64))
    # between entries, by hand: np.interp of log σ over the table's log σ against the indices
    log_sig = 0.5 * np.log((1 - table.numpy()) / table.numpy())
    ab = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.01, 1e-3], dtype=torch.float64)
    expected = np.interp(0.5 * np.log((1 - ab.numpy()) / ab.numpy()), log_sig, np.arange(len(table)))
    assert np.allclose(model.time_input(ab).numpy(), expected, rtol=0, atol=1e-9)
    assert not np.allclose(expected, np.round(expected))                 # the grid really falls between entries
    nearest = from_diffusers(tiny_unet(), sched, timesteps="nearest")
    assert torch.equal(nearest.time_input(ab), torch.as_tensor(np.round(expected)))
    # beyond the table's ends: the first and last timesteps
    assert model.time_input(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist() == [0.0, len(table) - 1]


def test_time_input_is_monotone_and_continuous():
    diffusers = pytest.importorskip("diffusers")
    model = from_diffusers(tiny_unet(), diffusers.DDPMScheduler())
    log_sigma = torch.linspace(float(model.log_sigmas[0]) - 1, float(model.log_sigmas[-1]) + 1, 20001,
                               dtype=torch.float64)
    t = model.time_input(1 / (1 + (2 * log_sigma).exp()))                 # ᾱ = 1/(1+σ²)
    assert (t.diff() >= 0).all() and t.diff().max() < 0.2                # increasing with the noise, no jumps
    assert t[0] == 0 and t[-1] == 999 and len(t.unique()) > 15000


# ---- diffusers: conversions by hand -------------------------------------------------------------------------

def by_hand(prediction: str, out: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    a = ab.reshape(-1, 1, 1, 1)
    if prediction == "epsilon":
        a = a.clamp_min(ALPHA_BAR_FLOOR)
        return (x - (1 - a).sqrt() * out) / a.sqrt()       # x = √ᾱ x₀ + √(1−ᾱ) ε solved for x₀
    if prediction == "sample":
        return out
    return a.sqrt() * x - (1 - a).sqrt() * out             # v = √ᾱ ε − √(1−ᾱ) x₀ and x solved for x₀


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusers_conversion_by_hand(prediction):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(prediction_type=prediction)
    model = from_diffusers(unet, sched)
    assert isinstance(model, Denoiser) and model.image_shape == (1, 8, 8) and not model.conditional
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    table = sched.alphas_cumprod
    ab = torch.stack([table[0], table[333], torch.tensor(0.3), torch.tensor(0.97)])   # on and off the table
    t = torch.tensor([0.0, 333.0, *np.interp(0.5 * np.log((1 - ab[2:].double().numpy()) / ab[2:].double().numpy()),
                                             0.5 * np.log((1 - table.double().numpy()) / table.double().numpy()),
                                             np.arange(len(table)))])
    with torch.no_grad():
        out = unet(x, t.to(torch.float32)).sample
        expected = by_hand(prediction, out, x, ab)
        got = model(x, ab)
    assert got.shape == x.shape and torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, x, atol=1e-2)                             # the network really contributes


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusers_matches_the_schedulers_own_x0(prediction):
    """At the scheduler's own timesteps the adapter gives DDIM's pred_original_sample (diffusers' formula)."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(seed=3)
    sched = diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=False)
    sched.set_timesteps(10)
    model = from_diffusers(unet, sched)
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps[[0, 4, 9]]:
        x = torch.randn(2, 1, 8, 8, generator=g)
        with torch.no_grad():
            reference = sched.step(unet(x, t).sample, t, x).pred_original_sample
            got = model(x, sched.alphas_cumprod[t].expand(2))
        assert torch.allclose(got, reference, atol=1e-5, rtol=1e-5), (prediction, int(t))


def test_learned_variance_takes_the_prediction_channels():
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(channels=2, out_channels=4)
    sched = diffusers.DDPMScheduler(variance_type="learned_range")
    model = from_diffusers(unet, sched)
    x, ab = torch.randn(2, 2, 8, 8), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        eps = unet(x, model.time_input(ab).float()).sample[:, :2]
        assert torch.allclose(model(x, ab), by_hand("epsilon", eps, x, ab), atol=1e-5)
    with pytest.raises(AdapterError, match="must output 2"):
        from_diffusers(unet, diffusers.DDPMScheduler())                    # 4 channels but no learned variance


def test_class_conditional_unet_and_its_null_label():
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(num_class_embeds=4)
    sched = diffusers.DDPMScheduler()
    model = from_diffusers(unet, sched)
    x, ab, y = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.8]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps = unet(x, model.time_input(ab).float(), class_labels=y).sample
        assert torch.allclose(model(x, ab, labels=y), by_hand("epsilon", eps, x, ab), atol=1e-5)
    assert model.conditional and not model.unconditional_without_labels
    with pytest.raises(DenoiserInputError, match="class-conditional"):
        model(x, ab)
    guided = from_diffusers(unet, sched, null_label=3)
    with torch.no_grad():
        assert torch.allclose(guided(x, ab), guided(x, ab, labels=torch.full((3,), 3)))
        samples = sf.sampling.sample(guided, torch.randn(3, 1, 8, 8), steps=3, labels=y, guidance=2.0)
    assert torch.isfinite(samples).all()


def test_continuous_time_euler_feeds_a_quarter_log_sigma():
    """EulerDiscreteScheduler(timestep_type='continuous') gives v-prediction UNets c_noise = ¼ log σ."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    sched = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    model = from_diffusers(unet, sched)
    ab = torch.tensor([0.3, 0.9])
    sigma = ((1 - ab.double()) / ab.double()).sqrt()
    assert torch.allclose(model.time_input(ab), 0.25 * sigma.log())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        v = unet(x, (0.25 * sigma.log()).float()).sample
        assert torch.allclose(model(x, ab), by_hand("v_prediction", v, x, ab), atol=1e-5)


def test_diffusers_errors_are_clear():
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    with pytest.raises(AdapterError, match="no ᾱ table.*from_edm"):
        from_diffusers(unet, diffusers.ScoreSdeVeScheduler())
    with pytest.raises(AdapterError, match="flow-matching"):
        from_diffusers(unet, diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(AdapterError, match="prediction_type 'flow_prediction'.*epsilon, sample, v_prediction"):
        from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="flow_prediction"))
    with pytest.raises(AdapterError, match="timesteps must be one of"):
        from_diffusers(unet, diffusers.DDPMScheduler(), timesteps="round")
    with pytest.raises(AdapterError, match="null_label"):
        from_diffusers(unet, diffusers.DDPMScheduler(), null_label=0)
    with pytest.raises(AdapterError, match="must output 1"):
        from_diffusers(tiny_unet(out_channels=3), diffusers.DDPMScheduler())
    with pytest.raises(AdapterError, match="diffusers model"):
        from_diffusers(lambda x, t: x, diffusers.DDPMScheduler())
    text = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2)
    with pytest.raises(AdapterError, match="text-conditioned"):
        from_diffusers(text, diffusers.DDPMScheduler())
    model = from_diffusers(unet, diffusers.DDPMScheduler())
    with pytest.raises(DenoiserInputError, match="image shape"):
        model(torch.randn(1, 1, 9, 9), 0.5)


# ---- diffusers: the analyses run on the adapted model unchanged ---------------------------------------------

def test_every_analysis_runs_on_an_adapted_diffusers_unet(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = from_diffusers(tiny_unet(), diffusers.DDPMScheduler(prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, name="toy")
    noise = torch.randn(4, 1, 8, 8, generator=g)

    for sampler in ("ddim", "heun", "edm"):                                # samplers
        assert torch.isfinite(sf.sampling.sample(model, noise, steps=4, sampler=sampler)).all()

    rf = receptive_field(model, alpha_bars=[0.2, 0.8], n=2, progress=False)
    assert rf.method == "autograd" and rf.maps.shape == (2, 8, 8) and (rf.maps > 0).any()

    info = sf.analysis.information
    traj = info.record(model, noise, steps=4, progress=False)
    assert np.isfinite(info.two_point(traj, bootstrap=4).rho).any()

    crit = sf.analysis.criticality
    soft = crit.mode_softening(model, noise.double() * 0.5, 0.5, schedule="cosine", shells=3)
    assert torch.isfinite(soft.lambdas).all()
    assert torch.isfinite(crit.correlation_length(sf.sampling.sample(model, noise, steps=3))).all()

    res = sf.experiments.predict(model, data, theories=["is"], seeds=range(2), steps=3, out=tmp_path,
                                 progress=False)
    assert (res.run_dir / "agreement.csv").exists() and res.samples["network"].shape == (2, 1, 8, 8)
    assert res.per_sample and set(res.scores) == {"is"}


def test_adapted_unet_moves_dtype_and_keeps_its_table():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler()
    model = from_diffusers(tiny_unet(), sched).double()
    assert next(model.parameters()).dtype == torch.float64 and model.alphas_cumprod.dtype == torch.float64
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert model(x, torch.tensor([0.3, 0.6], dtype=torch.float64)).dtype == torch.float64
    assert model.config["prediction_type"] == "epsilon" and model.config["num_train_timesteps"] == 1000


# ---- EDM / k-diffusion D(x, σ) -------------------------------------------------------------------------------

def test_from_edm_by_hand():
    D = ToyEDM()
    model = from_edm(D)
    assert isinstance(model, Denoiser) and model.image_shape == (1, 8, 8) and not model.conditional
    x = torch.randn(3, 1, 8, 8)
    ab = torch.tensor([0.05, 0.5, 0.95])
    with torch.no_grad():
        got = model(x, ab)
        sigma = ((1 - ab) / ab).sqrt()                                       # ᾱ = 1/(1+σ²)
        expected = D(x / ab.sqrt().reshape(-1, 1, 1, 1), sigma)              # x_ve = x_vp/√ᾱ
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(D.sigmas_seen[0], sigma, rtol=1e-6)


def test_from_edm_is_exact_on_a_gaussian():
    """D written in EDM's variables for N(μ, diag λ), adapted, is the VP posterior mean of the same Gaussian."""
    exact, mu, lam = diagonal_gaussian()
    model = from_edm(lambda x, sigma: ve_gaussian(x, sigma, mu, lam), image_shape=(1, 6, 6))
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    ab = torch.tensor([1e-3, 0.3, 0.7, 0.999], dtype=torch.float64)
    assert torch.allclose(model(x, ab), exact(x, ab), atol=1e-12)


def test_from_edm_labels_noise_free_rows_and_the_floor():
    D = ToyEDM(label_dim=3)
    model = from_edm(D)
    assert model.conditional and model.config["one_hot"] and model.unconditional_without_labels
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    ab = torch.tensor([1.0, 0.5, 0.0])
    with torch.no_grad():
        got = model(x, ab, labels=y)
        hot = nn.functional.one_hot(y, 3).float()
        floor_sigma = torch.tensor(math.sqrt((1 - ALPHA_BAR_FLOOR) / ALPHA_BAR_FLOOR))
        mid = D(x[1:2] / math.sqrt(0.5), torch.tensor([1.0]), class_labels=hot[1:2])
        low = D(x[2:] / math.sqrt(ALPHA_BAR_FLOOR), floor_sigma.reshape(1), class_labels=hot[2:])
    assert torch.equal(got[0], x[0])                                        # σ = 0: x̂₀ = x, D not called there
    assert torch.allclose(got[1:2], mid, atol=1e-5) and torch.allclose(got[2:], low, atol=1e-5)
    assert len(D.sigmas_seen[0]) == 2 and (D.sigmas_seen[0] > 0).all()
    assert torch.isfinite(model(x, ab)).all()                               # labels=None: no class_labels


def test_from_edm_errors():
    with pytest.raises(AdapterError, match="image_shape"):
        from_edm(lambda x, sigma: x)
    with pytest.raises(AdapterError, match="callable"):
        from_edm(3, image_shape=(1, 4, 4))
    with pytest.raises(AdapterError, match="num_classes"):
        from_edm(lambda x, sigma: x, image_shape=(1, 4, 4), conditional=True, one_hot=True)
    with pytest.raises(AdapterError, match="returned shape"):
        from_edm(lambda x, sigma: x[:, :, :2], image_shape=(1, 4, 4))(torch.randn(1, 1, 4, 4), 0.5)


# ---- scorefield → k-diffusion --------------------------------------------------------------------------------

def test_to_k_diffusion_by_hand_and_exact_on_a_gaussian():
    exact, mu, lam = diagonal_gaussian()
    k = to_k_diffusion(exact)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 40.0], dtype=torch.float64)
    ab = 1 / (1 + sigma**2)
    assert torch.allclose(k(x, sigma), exact(x * ab.sqrt().reshape(-1, 1, 1, 1), ab), atol=1e-12)
    assert torch.allclose(k(x, sigma), ve_gaussian(x, sigma, mu, lam), atol=1e-12)   # EDM's D of the same data
    assert torch.allclose(k(x, 0.0), x)                                     # a scalar σ; σ = 0 is noise-free


@pytest.mark.parametrize("kind", ["gaussian", "net", "conditional-net", "els", "float32-net"])
def test_round_trip_from_edm_of_to_k_diffusion_is_the_model(kind):
    if kind == "gaussian":
        model, labels = diagonal_gaussian()[0], None
    elif kind == "els":
        g = torch.Generator().manual_seed(0)
        data = sf.data.ImageSet(torch.rand(10, 1, 6, 6, generator=g) * 2 - 1, name="toy")
        model, labels = sf.models.make("els", data, patch_size=3, padding="circular"), None
    else:
        model = random_net(conditional=kind == "conditional-net",
                           dtype=torch.float32 if kind == "float32-net" else torch.float64)
        labels = torch.tensor([0, 2, 1, 0]) if kind == "conditional-net" else None
    dtype = torch.float32 if kind == "float32-net" else torch.float64
    back = from_edm(to_k_diffusion(model))
    assert back.image_shape == model.image_shape and back.conditional == model.conditional
    assert back.config["padding"] == model.config.get("padding", "zeros")
    shape = (4, *model.image_shape)
    x = torch.randn(shape, dtype=dtype)
    ab = torch.tensor([1e-3, 0.2, 0.7, 0.9999], dtype=dtype)
    with torch.no_grad():
        want, got = model(x, ab, labels), back(x, ab, labels)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    if kind == "conditional-net":                                            # labels=None: the null class
        assert torch.allclose(back(x, ab), model(x, ab), atol=tol)


def test_to_k_diffusion_of_from_edm_is_D():
    D = ToyEDM().double()
    k = to_k_diffusion(from_edm(D))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.02, 1.5, 60.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(k(x, sigma), D(x, sigma), atol=1e-10)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "edm"])
def test_sigma_table_like_k_diffusions_wrappers(schedule):
    exact = diagonal_gaussian()[0]
    k = to_k_diffusion(exact, schedule)
    sched = sf.schedules.get_schedule(schedule)
    assert len(k.sigmas) == 1000 and (k.sigmas.diff() > 0).all()
    assert float(k.sigma_max) == pytest.approx(80.0, rel=1e-6)
    assert float(k.sigma_min) > 0 and float(k.sigma_min) == float(k.sigmas[0])
    if schedule == "edm":
        assert float(k.sigma_min) == pytest.approx(0.002, rel=1e-6)      # EDM's own σ_min
    sigmas = k.get_sigmas(7)
    assert sigmas.shape == (8,) and float(sigmas[-1]) == 0.0 and (sigmas.diff() < 0).all()
    assert float(sigmas[0]) == pytest.approx(float(k.sigma_max), rel=1e-5)
    assert float(sigmas[-2]) == pytest.approx(float(k.sigma_min), rel=1e-4)
    t = k.sigma_to_t(sigmas[:-1])
    assert torch.allclose(t.diff(), t.diff()[:1].expand(6), rtol=1e-4)         # uniform in the schedule's time
    assert torch.allclose(k.t_to_sigma(t), sigmas[:-1].double(), rtol=1e-5)
    assert torch.allclose(sched.sigma_ve(t), sigmas[:-1].double(), rtol=1e-5)
    assert torch.equal(k.get_sigmas()[:-1], k.sigmas.flip(0))


def test_to_k_diffusion_errors():
    exact = diagonal_gaussian()[0]
    with pytest.raises(AdapterError, match="Denoiser"):
        to_k_diffusion(lambda x, ab: x)
    with pytest.raises(AdapterError, match="unknown schedule"):
        to_k_diffusion(exact, "quadratic")
    with pytest.raises(TypeError, match="labels= only"):
        to_k_diffusion(exact)(torch.randn(1, 1, 6, 6, dtype=torch.float64), 1.0, cond=3)
    with pytest.raises(DenoiserInputError, match="unconditional but labels"):
        to_k_diffusion(exact)(torch.randn(1, 1, 6, 6, dtype=torch.float64), 1.0, labels=torch.tensor([0]))


# ---- k-diffusion's samplers on scorefield machines ---------------------------------------------------------

def test_edm_heun_on_the_k_diffusion_model_is_scorefields_edm_sampler():
    """k-diffusion's Heun (written here to its equations) on to_k_diffusion(model) walks the same states as
    sf.sampling's EDM sampler on the model: both are Karras Alg. 1, one in VE, one through the call convention."""
    model = random_net()
    k = to_k_diffusion(model, "edm")
    sigmas = k.get_sigmas(6).double()
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ours = sf.sampling.sample(model, noise / math.sqrt(1 + float(sigmas[0]) ** 2), sampler="edm",
                                  schedule="edm", ts=sigmas)
        theirs = edm_heun(k, noise, sigmas)
    assert torch.allclose(ours, theirs, atol=1e-9)


def test_k_diffusion_samplers_solve_the_gaussian_flow_exactly():
    """The probability-flow ODE dx/dσ = (x − D(x, σ))/σ of N(μ, diag λ) in EDM's variables has the solution
    x(σ) = μ + √((λ+σ²)/(λ+σ₀²))·(x(σ₀) − μ); Heun and Euler on to_k_diffusion(exact denoiser) converge to it
    at their orders (error ÷4 and ÷2 per halved step)."""
    exact, mu, lam = diagonal_gaussian()
    k = to_k_diffusion(exact, "edm", sigma_max=20.0)
    x_start = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20.0
    want = (mu + (lam / (lam + 20.0**2)).sqrt() * (x_start.reshape(3, -1) - mu)).reshape(x_start.shape)
    errors = {"heun": [], "euler": []}
    for n in (20, 40, 80):
        sigmas = sf.schedules.karras_sigmas(n, float(k.sigma_min), float(k.sigma_max))
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        errors["heun"].append(float((edm_heun(k, x_start, sigmas) - want).abs().max()))
        errors["euler"].append(float((edm_euler(k, x_start, sigmas) - want).abs().max()))
    heun, euler = np.array(errors["heun"]), np.array(errors["euler"])
    assert heun[-1] < 5e-3 and ((heun[:-1] / heun[1:]) > 3.5).all(), heun
    assert ((euler[:-1] / euler[1:]) > 1.8).all() and ((euler[:-1] / euler[1:]) < 2.2).all(), euler


def load_k_diffusion(module: str = "sampling") -> types.ModuleType:
    """k_diffusion.<module>; when the package itself cannot import (its __init__ and utils import torchvision,
    broken on some CPU installs), the module's file alone, with the one helper it takes from utils."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq "
                    "trampoline runs these tests without its CUDA torch)")
    try:
        return importlib.import_module(f"k_diffusion.{module}")
    except Exception:  # noqa: BLE001  (torchvision may fail with any error on import)
        pass
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    folder = Path(list(spec.submodule_search_locations)[0])
    name = "_kdiffusion_alone"
    if name not in sys.modules:
        package, utils = types.ModuleType(name), types.ModuleType(f"{name}.utils")
        package.__path__ = [str(folder)]
        utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
        sys.modules[name], sys.modules[utils.__name__] = package, utils
    return importlib.import_module(f"{name}.{module}")


def test_k_diffusions_own_samplers_run_scorefield_models():
    K = load_k_diffusion()
    model = random_net()
    k = to_k_diffusion(model, "edm")
    sigmas = K.get_sigmas_karras(6, float(k.sigma_min), float(k.sigma_max)).double()
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        theirs = K.sample_heun(k, noise * sigmas[0], sigmas, disable=True)
        ours = sf.sampling.sample(model, noise * sigmas[0] / math.sqrt(1 + float(sigmas[0]) ** 2), sampler="edm",
                                  schedule="edm", ts=sigmas)
    assert torch.allclose(theirs, ours, atol=1e-9)
    exact, mu, lam = diagonal_gaussian()
    kg = to_k_diffusion(exact, "edm", sigma_max=20.0)
    sigmas = K.get_sigmas_karras(100, float(kg.sigma_min), float(kg.sigma_max)).double()
    x0 = torch.randn(2, 1, 6, 6, dtype=torch.float64) * sigmas[0]
    want = (mu + (lam / (lam + sigmas[0] ** 2)).sqrt() * (x0.reshape(2, -1) - mu)).reshape(x0.shape)
    for name in ("sample_heun", "sample_dpmpp_2m", "sample_lms", "sample_dpm_2"):
        assert torch.allclose(getattr(K, name)(kg, x0, sigmas, disable=True), want, atol=3e-3), name


def test_k_diffusions_discrete_wrapper_agrees_with_from_diffusers():
    """k-diffusion's own wrapper of a discrete ε-model (DiscreteEpsDDPMDenoiser, quantize=False) and
    to_k_diffusion(from_diffusers(...)) are the same function: the same ᾱ → timestep interpolation."""
    diffusers = pytest.importorskip("diffusers")
    external = load_k_diffusion("external")
    unet, sched = tiny_unet(), diffusers.DDPMScheduler()
    theirs = external.DiscreteEpsDDPMDenoiser(lambda x, t: unet(x, t).sample, sched.alphas_cumprod, quantize=False)
    ours = to_k_diffusion(from_diffusers(unet, sched))
    x = torch.randn(3, 1, 8, 8) * 3
    sigma = torch.tensor([0.05, 0.9, 30.0])
    with torch.no_grad():
        assert torch.allclose(ours(x, sigma), theirs(x, sigma), atol=1e-4, rtol=1e-4)


# ---- CUDA (run with `pytest -m gpu`; skipped by default and in CI) -------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapters_on_cuda_match_the_cpu():
    diffusers = pytest.importorskip("diffusers")
    x, ab = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 0.5, 0.95])
    cpu = from_diffusers(tiny_unet(), diffusers.DDPMScheduler(prediction_type="v_prediction"))
    gpu = from_diffusers(tiny_unet(), diffusers.DDPMScheduler(prediction_type="v_prediction")).to("cuda")
    half = from_diffusers(tiny_unet().half(), diffusers.DDPMScheduler(prediction_type="v_prediction")).to("cuda")
    k_cpu, k_gpu = to_k_diffusion(random_net(dtype=torch.float32)), to_k_diffusion(random_net(dtype=torch.float32))
    k_gpu = k_gpu.to("cuda")
    edm_cpu, edm_gpu = from_edm(ToyEDM()), from_edm(ToyEDM()).to("cuda")
    sigma = torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        want = cpu(x, ab)
        assert torch.allclose(gpu(x.cuda(), ab.cuda()).cpu(), want, atol=1e-4)
        assert torch.allclose(half(x.cuda(), ab.cuda()).cpu(), want, atol=5e-2)
        assert torch.allclose(k_gpu(x.cuda(), sigma.cuda()).cpu(), k_cpu(x, sigma), atol=1e-4)
        assert k_gpu.get_sigmas(5).device.type == "cuda"
        assert torch.allclose(edm_gpu(x.cuda(), ab.cuda()).cpu(), edm_cpu(x, ab), atol=1e-4)
        assert torch.isfinite(sf.sampling.sample(gpu, x.cuda(), steps=3)).all()
