"""A diffusers `UNet2DModel` with its scheduler as a scorefield denoiser.

A discrete diffusers model was trained at the integer timesteps t = 0…T−1 of its scheduler's table
ᾱ_t = `scheduler.alphas_cumprod[t]` (DDPM, Ho et al. 2020, eq. 4: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, the VP state of
the call convention). The adapter maps the call's ᾱ to the timestep input of the UNet by that table and
converts the UNet's output to x̂₀ with the call's own ᾱ:

    ε-prediction ("epsilon"):      x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ               (DDPM eq. 15)
    x₀-prediction ("sample"):      x̂₀ = the output
    v-prediction ("v_prediction"): x̂₀ = √ᾱ x − √(1−ᾱ) v̂, v = √ᾱ ε − √(1−ᾱ) x₀   (Salimans & Ho 2022, §4)

ᾱ → timestep, `timesteps="interpolate"` (the default): the fractional timestep t whose log σ, σ = √((1−ᾱ)/ᾱ),
lies linearly between the table's neighbouring entries, i.e. t = i + (log σ − log σᵢ)/(log σᵢ₊₁ − log σᵢ).
This is what k-diffusion's wrappers of discrete models do (`DiscreteSchedule.sigma_to_t`, quantize=False, the
default of its CompVis / diffusers wrappers) and what diffusers' own Euler / Karras schedulers do
(`_sigma_to_t`); it is exact on the table (ᾱ = ᾱ_t gives the integer t the network was trained at), continuous
and monotone in ᾱ in between (the sinusoidal time embedding takes fractional t), so the adapted denoiser is a
smooth function of the noise level on any sampler's grid, not a staircase of 1000 levels. `timesteps="nearest"`
rounds that t to the nearest table entry (k-diffusion's quantize=True): only trained inputs, at the price of a
denoiser that jumps between levels. ᾱ beyond the table's ends maps to t = 0 or T−1.

The conversion uses the call's ᾱ (the state's true noise level) in either mode, and ε-prediction divides by
√max(ᾱ, 10⁻⁴) as the toolkit's own nets do (`nets.ALPHA_BAR_FLOOR`). The scheduler's sampling-time options
(`clip_sample`, `thresholding`, timestep spacing) belong to its sampler, not to the model, and are not applied:
pass `clip_x0=True` to scorefield's sampler for the first.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..base import Denoiser
from ..nets import ALPHA_BAR_FLOOR
from .errors import AdapterError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_MODES = ("interpolate", "nearest")
LEARNED_VARIANCE = ("learned", "learned_range")
PADDINGS = ("zeros", "circular")


def _config(obj: Any) -> dict[str, Any]:
    return dict(getattr(obj, "config", None) or {})


def log_sigma_of(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log σ = ½(log(1−ᾱ) − log ᾱ) in float64; −∞ at ᾱ = 1, +∞ at ᾱ = 0."""
    ab = alpha_bar.to(torch.float64).clamp(0.0, 1.0)
    return 0.5 * (torch.log1p(-ab) - torch.log(ab))


def interpolate_timestep(log_sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fractional index t of `log_sigma` [B] in the increasing table [T] of log σ_t, linear between entries and
    clamped to [0, T−1] (k-diffusion's DiscreteSchedule.sigma_to_t); float64 [B]."""
    table = table.to(log_sigma.device)
    hi = torch.searchsorted(table, log_sigma.contiguous()).clamp(1, len(table) - 1)
    lo = hi - 1
    w = ((log_sigma - table[lo]) / (table[hi] - table[lo])).nan_to_num(0.0).clamp(0.0, 1.0)
    return lo.to(torch.float64) + w


class DiffusersDenoiser(Denoiser):
    """A diffusers UNet (ε-, x₀- or v-prediction) and its scheduler's ᾱ table behind the denoiser call
    (module docstring). Build it with `from_diffusers(unet, scheduler)`."""

    name = "diffusers"

    def __init__(self, unet: torch.nn.Module, scheduler: Any, timesteps: str = "interpolate",
                 null_label: int | None = None, image_shape: tuple[int, int, int] | None = None,
                 padding: str = "zeros") -> None:
        unet_cfg, sched_cfg = _config(unet), _config(scheduler)
        if not isinstance(unet, torch.nn.Module) or not unet_cfg:
            raise AdapterError(f"from_diffusers: unet must be a diffusers model (a torch Module with a .config), "
                               f"got {type(unet).__name__}")
        if unet_cfg.get("cross_attention_dim") is not None or "encoder_hid_dim" in unet_cfg:
            raise AdapterError(f"from_diffusers: {type(unet).__name__} is text-conditioned (it needs "
                               "encoder_hidden_states); only image UNets such as UNet2DModel are supported")
        image_shape = _image_shape(unet_cfg, image_shape)
        prediction = sched_cfg.get("prediction_type", "epsilon")
        table = _alpha_bar_table(scheduler, sched_cfg)
        if prediction not in PREDICTION_TYPES:
            raise AdapterError(f"from_diffusers: prediction_type {prediction!r} of {type(scheduler).__name__} is not "
                               f"supported; supported: {', '.join(PREDICTION_TYPES)}")
        if timesteps not in TIMESTEP_MODES:
            raise AdapterError(f"from_diffusers: timesteps must be one of {', '.join(TIMESTEP_MODES)}, "
                               f"got {timesteps!r}")
        if padding not in PADDINGS:
            raise AdapterError(f"from_diffusers: padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        channels_in = int(unet_cfg.get("in_channels", image_shape[0]))
        channels_out = int(unet_cfg.get("out_channels", channels_in))
        variance = sched_cfg.get("variance_type")
        self.learned_variance = variance in LEARNED_VARIANCE
        if channels_in != image_shape[0]:
            raise AdapterError(f"from_diffusers: the UNet takes {channels_in} channels but image_shape has "
                               f"{image_shape[0]}")
        expected_out = 2 * channels_in if self.learned_variance else channels_in
        if channels_out != expected_out:
            raise AdapterError(f"from_diffusers: the UNet outputs {channels_out} channels; a {prediction} model with "
                               f"variance_type={variance!r} must output {expected_out} (the prediction"
                               f"{' and the learned variance' if self.learned_variance else ''})")
        conditional = getattr(unet, "class_embedding", None) is not None
        if null_label is not None and not conditional:
            raise AdapterError("from_diffusers: null_label is for class-conditional UNets (num_class_embeds), and "
                               "this one has no class embedding")
        # EulerDiscreteScheduler(timestep_type="continuous") feeds v-prediction UNets c_noise = ¼ log σ, not t
        continuous = sched_cfg.get("timestep_type") == "continuous" and prediction == "v_prediction"
        config = {"name": "diffusers", "unet": type(unet).__name__, "scheduler": type(scheduler).__name__,
                  "prediction_type": prediction, "num_train_timesteps": len(table),
                  "timesteps": "continuous" if continuous else timesteps, "variance_type": variance,
                  "null_label": null_label, "padding": padding}
        super().__init__(image_shape, config)
        self.unet = unet
        self.prediction_type = prediction
        self.timesteps = timesteps
        self.continuous_time = continuous
        self.conditional = conditional
        self.unconditional_without_labels = null_label is not None
        self.null_label = null_label
        self.padding = padding
        self.alphas_cumprod = table                          # [T] float64, decreasing
        self.log_sigmas = log_sigma_of(table)                # [T] float64, increasing

    def time_input(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """ᾱ [B] → the UNet's timestep input [B] (float64): fractional or nearest table index (module docstring),
        or ¼ log σ for a continuous-time Euler model."""
        log_sigma = log_sigma_of(alpha_bar)
        if self.continuous_time:
            table = self.log_sigmas.to(log_sigma.device)
            return 0.25 * log_sigma.clamp(table[0], table[-1])
        t = interpolate_timestep(log_sigma, self.log_sigmas)
        return t.round() if self.timesteps == "nearest" else t

    def predict(self, x: torch.Tensor, alpha_bar: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output (ε̂, x̂₀ or v̂, by prediction_type) [B, C, H, W] in x's dtype."""
        dtype = next((p.dtype for p in self.unet.parameters()), x.dtype)
        kwargs = {}
        if self.conditional:
            labels = torch.full((x.shape[0],), self.null_label, dtype=torch.int64, device=x.device) \
                if labels is None else labels
            kwargs["class_labels"] = labels
        t = self.time_input(alpha_bar).to(torch.float32)   # the sinusoidal embedding works in float32 anyway
        with _differentiable_attention(torch.is_grad_enabled() and x.requires_grad):
            out = self.unet(x.to(dtype), t, **kwargs)
        out = getattr(out, "sample", out)
        out = out[0] if isinstance(out, tuple) else out
        if self.learned_variance:                          # [ε̂ | variance]: diffusers' DDPMScheduler.step splits it
            out = out[:, :x.shape[1]]
        return out.to(x.dtype)

    def denoise(self, x: torch.Tensor, alpha_bar: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.predict(x, alpha_bar, labels)           # [B, C, H, W]
        if self.prediction_type == "sample":
            return out
        ab = alpha_bar.reshape(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return ab.sqrt() * x - (1 - ab).sqrt() * out
        ab = ab.clamp_min(ALPHA_BAR_FLOOR)                 # ε-prediction divides by √ᾱ (module docstring)
        return (x - (1 - ab).sqrt() * out) / ab.sqrt()


def _differentiable_attention(needed: bool) -> contextlib.AbstractContextManager:
    """PyTorch's math attention while x carries a graph: the fused CPU / flash kernels that diffusers' attention
    blocks reach through scaled_dot_product_attention have no double backward, which the Jacobian-vector
    products of the analyses (criticality's mode softening, `torch.autograd.functional.jvp`) take."""
    if not needed:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has the math kernel only on CPU
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _image_shape(unet_cfg: dict[str, Any], image_shape: Any) -> tuple[int, int, int]:
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise AdapterError(f"from_diffusers: image_shape must be (C, H, W), got {image_shape!r}")
        return shape  # type: ignore[return-value]
    size = unet_cfg.get("sample_size")
    channels = unet_cfg.get("in_channels")
    if size is None or channels is None:
        raise AdapterError("from_diffusers: the UNet's config has no sample_size / in_channels; pass "
                           "image_shape=(C, H, W)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(channels), int(h), int(w)


def _alpha_bar_table(scheduler: Any, sched_cfg: dict[str, Any]) -> torch.Tensor:
    """The scheduler's training table ᾱ_t [T] in float64, checked to be a VP table (decreasing in (0, 1])."""
    name = type(scheduler).__name__
    if sched_cfg.get("use_flow_sigmas") or "shift" in sched_cfg and not hasattr(scheduler, "alphas_cumprod"):
        raise AdapterError(f"from_diffusers: {name} is a flow-matching scheduler (x_t = (1−t) x₀ + t ε), not the "
                           "variance-preserving process of the call convention; it is not supported")
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        hint = (" (a variance-exploding model: wrap its D(x, σ) with from_edm)"
                if "sigma_max" in sched_cfg or "Ve" in name else "")
        raise AdapterError(f"from_diffusers: {name} has no ᾱ table (alphas_cumprod), so its timesteps cannot be "
                           f"matched to ᾱ{hint}; use a DDPM / DDIM / PNDM / Euler / DPM-Solver style scheduler")
    table = torch.as_tensor(table).detach().to("cpu", torch.float64).reshape(-1)
    if len(table) < 2 or not torch.isfinite(table).all():
        raise AdapterError(f"from_diffusers: {name}.alphas_cumprod must be a finite table of at least 2 entries")
    # a zero-terminal-SNR table ends at ᾱ = 0 exactly; diffusers' Euler sets it to 2⁻²⁴ for the same reason
    table = table.clamp_min(2.0 ** -24)
    if (table > 1).any() or not (table[1:] < table[:-1]).all():
        raise AdapterError(f"from_diffusers: {name}.alphas_cumprod must decrease strictly within (0, 1]")
    if not math.isfinite(float(log_sigma_of(table[:1])[0])):
        table[0] = min(float(table[0]), 1.0 - 2.0 ** -40)   # ᾱ_0 = 1 would put timestep 0 at log σ = −∞
    return table


def from_diffusers(unet: torch.nn.Module, scheduler: Any, *, timesteps: str = "interpolate",
                   null_label: int | None = None, image_shape: tuple[int, int, int] | None = None,
                   padding: str = "zeros") -> DiffusersDenoiser:
    """A diffusers UNet (e.g. `UNet2DModel`) and its scheduler as a scorefield denoiser.

        unet = diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, ...)   # or .from_pretrained
        model = sf.models.adapters.from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="epsilon"))

    scheduler: any scheduler with an ᾱ table (`alphas_cumprod`) and `prediction_type` 'epsilon', 'sample' or
    'v_prediction'. timesteps: 'interpolate' (fractional timestep, linear in log σ between table entries, the
    default) or 'nearest' (see the module docstring for why). null_label: the class index that means "no class"
    for a class-conditional UNet trained with label dropout (then labels=None is the unconditional model, as
    classifier-free guidance needs). image_shape: (C, H, W), default from the UNet's in_channels and
    sample_size. padding: the UNet's convolution padding as the analyses should read it (diffusers pads with
    zeros).
    """
    return DiffusersDenoiser(unet, scheduler, timesteps=timesteps, null_label=null_label, image_shape=image_shape,
                             padding=padding)
