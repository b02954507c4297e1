"""Trainable convolutional denoisers: the ResNet and UNet of kamb-ganguli App. C.1, the small UNet of the
criticality paper (ambrogioni App. F.3) and a plain ConvNet (eft-information-spreading Sec. 4).

Every net predicts the noise ε̂ (ε-prediction, kamb-ganguli eq. 27) from the noisy image and its own time
input, and the denoiser call returns x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ (inverse of eq. 20). The network receives ᾱ
like every denoiser and maps it to the time of the schedule it was trained on, t = schedule.t_from_alpha_bar(ᾱ),
normalized to τ = (t − t_min)/(t_max − t_min) ∈ [0, 1], then a sinusoidal embedding of 1000·τ (the DDPM
integer-step scale, so that the log-spaced frequencies resolve τ).

ᾱ → 0 guard: the conversion ε̂ → x̂₀ divides by √ᾱ, so it is evaluated at max(ᾱ, ALPHA_BAR_FLOOR) = 1e-4.
A sampler that converts x̂₀ back with the true ᾱ then gets ε̂ = x at ᾱ = 0, which is exact there (x = ε).

Class conditioning uses a label embedding with one extra "null" class; `labels=None` selects the null class,
so a network trained with label dropout also gives the unconditional prediction.

No net uses normalization except the F.3 UNet (GroupNorm, as the paper specifies): kamb-ganguli avoid it so
that no information travels non-locally across the image.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..options import closest
from ..schedules import SCHEDULES, get_schedule
from .base import Denoiser, DenoiserInputError, check_denoiser_inputs
from .registry import ModelConfigError, register_model

ALPHA_BAR_FLOOR = 1e-4
PADDINGS = ("zeros", "circular")
TIME_SCALE = 1000.0

# Paper sizes are "paper"; "small" and "tiny" keep depth (hence the receptive field) and narrow the width.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "resnet": {  # kamb-ganguli App. C.1: 8 convs (up, 6 × 3×3 at 256 channels, down) → formal RF 17×17
        "paper": {"width": 256, "depth": 6, "emb_dim": 256},
        "small": {"width": 32, "depth": 6, "emb_dim": 64},
        "tiny": {"width": 8, "depth": 6, "emb_dim": 16},
    },
    "unet": {  # kamb-ganguli App. C.1: 3 scales, channels 64/128/256, residual blocks, no normalization
        "paper": {"channels": [64, 128, 256], "emb_dim": 256},
        "small": {"channels": [32, 64, 128], "emb_dim": 128},
        "tiny": {"channels": [8, 16, 32], "emb_dim": 16},
    },
    "unet-small": {  # ambrogioni App. F.3: time embedding d = 128, GroupNorm, residual blocks 64 → 128
        "paper": {"channels": [64, 128], "emb_dim": 128, "groups": 8},
        "small": {"channels": [32, 64], "emb_dim": 64, "groups": 8},
        "tiny": {"channels": [8, 16], "emb_dim": 16, "groups": 4},
    },
    "convnet": {  # eft-information-spreading: a plain ConvNet (3×3 convs, no residuals)
        "paper": {"width": 64, "depth": 6, "emb_dim": 128},
        "small": {"width": 32, "depth": 6, "emb_dim": 64},
        "tiny": {"width": 8, "depth": 4, "emb_dim": 16},
    },
}


# ---- time and class embeddings ----------------------------------------------------------------------------

def sinusoidal_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] → [B, dim]: sin/cos of 1000·τ at frequencies ω_k = exp(−(k/(dim/2)) log 10000) (ambrogioni F.3.1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=tau.dtype, device=tau.device) / half)
    angle = TIME_SCALE * tau[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class Embedding(nn.Module):
    """Time (sinusoidal + 2-layer SiLU MLP, ambrogioni F.3.1) plus an optional class embedding with a null class."""

    def __init__(self, emb_dim: int, num_classes: int, conditional: bool) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # index num_classes is the null class used for label dropout and labels=None
        self.classes = nn.Embedding(num_classes + 1, emb_dim) if conditional else None

    def forward(self, tau: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.mlp(sinusoidal_embedding(tau, self.emb_dim))  # [B, E]
        if self.classes is not None:
            emb = emb + self.classes(labels)
        return emb


def _conv3(cin: int, cout: int, padding: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding)


def _broadcast(v: torch.Tensor) -> torch.Tensor:
    return v[:, :, None, None]  # [B, C] → [B, C, 1, 1]


# ---- the shared net denoiser ------------------------------------------------------------------------------

class NetDenoiser(Denoiser):
    """A trainable ε-prediction network behind the denoiser interface (see the module docstring)."""

    name = "net"

    def __init__(self, image_shape: tuple[int, int, int], emb_dim: int, num_classes: int = 0,
                 conditional: bool = False, schedule: str = "cosine", padding: str = "zeros",
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(image_shape, config)
        self.schedule = get_schedule(schedule)
        self.conditional = bool(conditional)
        self.unconditional_without_labels = True   # labels=None is the null class
        self.num_classes = int(num_classes)
        self.padding = padding
        self.embedding = Embedding(emb_dim, self.num_classes, self.conditional)

    @property
    def null_label(self) -> int:
        """The label index that asks for the unconditional prediction."""
        return self.num_classes

    def time_input(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """ᾱ [B] → τ [B] ∈ [0, 1], the schedule's time rescaled to the unit interval."""
        s = self.schedule
        t = s.t_from_alpha_bar(alpha_bar.to(torch.float64).clamp(0.0, 1.0))
        return ((t - s.t_min) / (s.t_max - s.t_min)).clamp(0.0, 1.0)

    def _labels(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if labels is None:
            return torch.full((batch,), self.null_label, dtype=torch.int64, device=device)
        if (labels < 0).any() or (labels > self.null_label).any():
            raise DenoiserInputError(
                f"labels must lie in [0, {self.num_classes - 1}] (or {self.null_label} = unconditional), "
                f"got range [{labels.min().item()}, {labels.max().item()}]")
        return labels

    def predict_eps(self, x: torch.Tensor, alpha_bar: torch.Tensor,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's noise estimate ε̂ (kamb-ganguli eq. 27); x: [B, C, H, W], alpha_bar: [B]."""
        dtype = next(self.parameters()).dtype
        labels = self._labels(labels, x.shape[0], x.device)
        tau = self.time_input(alpha_bar).to(dtype)
        emb = self.embedding(tau, labels)  # [B, E]
        return self.backbone(x.to(dtype), emb).to(x.dtype)

    def backbone(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, alpha_bar: torch.Tensor,
                labels: torch.Tensor | None) -> torch.Tensor:
        from ..convert import x0_from_eps

        eps = self.predict_eps(x, alpha_bar, labels)  # [B, C, H, W]
        return x0_from_eps(x, eps, alpha_bar.clamp_min(ALPHA_BAR_FLOOR))

    def forward(self, x: torch.Tensor, alpha_bar: torch.Tensor | float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        # unlike analytic conditional machines, labels=None is valid here: it is the null (unconditional) class
        x, ab, labels = check_denoiser_inputs(x, alpha_bar, labels, self.image_shape)
        if labels is not None and not self.conditional:
            raise DenoiserInputError(f"{self.name} is unconditional but labels were given (they would be ignored); "
                                     "train a conditional network or pass labels=None")
        return self.denoise(x, ab, labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def formal_receptive_field(self) -> int | None:
        """Side of the square of input pixels an output pixel can depend on (None: the whole image)."""
        return None

    def summary(self) -> dict[str, Any]:
        """Plain-data description: architecture, size, receptive field."""
        return {"name": self.config.get("name", self.name), "parameters": self.num_parameters(),
                "image_shape": list(self.image_shape), "conditional": self.conditional,
                "num_classes": self.num_classes, "schedule": self.schedule.name, "padding": self.padding,
                "formal_receptive_field": self.formal_receptive_field, "config": self.config}


# ---- ResNet (kamb-ganguli App. C.1) -----------------------------------------------------------------------

class ResNetDenoiser(NetDenoiser):
    """Up-projection 3×3 conv, `depth` residual 3×3 conv + ReLU layers at `width` channels, down-projection
    3×3 conv; the embedding is added before each conv on the hidden stream. Formal RF: 1 + 2·(depth + 2)."""

    name = "resnet"

    def __init__(self, image_shape: tuple[int, int, int], width: int, depth: int, emb_dim: int,
                 **common: Any) -> None:
        super().__init__(image_shape, emb_dim, **common)
        channels = self.image_shape[0]
        self.depth = depth
        self.up = _conv3(channels, width, self.padding)
        self.layers = nn.ModuleList(_conv3(width, width, self.padding) for _ in range(depth))
        self.projections = nn.ModuleList(nn.Linear(emb_dim, width) for _ in range(depth + 1))
        self.down = _conv3(width, channels, self.padding)

    def backbone(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # [B, W, H, W]
        for conv, proj in zip(self.layers, self.projections[:-1], strict=True):
            h = h + F.relu(conv(h + _broadcast(proj(emb))))
        return self.down(h + _broadcast(self.projections[-1](emb)))  # [B, C, H, W]

    @property
    def formal_receptive_field(self) -> int:
        return 1 + 2 * (self.depth + 2)


# ---- UNets ------------------------------------------------------------------------------------------------

def _group_count(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """norm → act → 3×3 conv → + embedding → norm → act → 3×3 conv, plus a (1×1 if needed) skip
    (ambrogioni F.3.2; with norm = identity and ReLU it is the normalization-free block of kamb-ganguli)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, padding: str, groups: int | None,
                 activation: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_group_count(cin, groups), cin) if groups else nn.Identity()
        self.conv1 = _conv3(cin, cout, padding)
        self.projection = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_group_count(cout, groups), cout) if groups else nn.Identity()
        self.conv2 = _conv3(cout, cout, padding)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = activation()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + _broadcast(self.projection(emb))
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


def _match(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop or zero-pad h [B, C, h, w] to like's spatial size (odd sizes do not halve exactly)."""
    dh, dw = like.shape[2] - h.shape[2], like.shape[3] - h.shape[3]
    if dh == 0 and dw == 0:
        return h
    return F.pad(h, [0, dw, 0, dh])


def _check_min_size(image_shape: tuple[int, ...], levels: int, name: str) -> None:
    need = 2 ** (levels - 1)
    if min(image_shape[1:]) < need:
        raise ModelConfigError(
            f"{name} with {levels} scales needs images of at least {need}×{need}, got {tuple(image_shape[1:])}")


class UNetDenoiser(NetDenoiser):
    """kamb-ganguli App. C.1 UNet: one residual block per scale (channels e.g. 64/128/256), max-pool down,
    transposed-conv up, skip connections by concatenation, ReLU, no normalization."""

    name = "unet"

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], emb_dim: int,
                 **common: Any) -> None:
        super().__init__(image_shape, emb_dim, **common)
        _check_min_size(self.image_shape, len(channels), self.name)
        c_img, pad = self.image_shape[0], self.padding
        block = dict(emb_dim=emb_dim, padding=pad, groups=None, activation=nn.ReLU)
        self.inp = _conv3(c_img, channels[0], pad)
        cins = [channels[0], *channels[:-1]]
        self.encoder = nn.ModuleList(ResBlock(ci, co, **block) for ci, co in zip(cins, channels, strict=True))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        lower, upper = channels[:0:-1], channels[-2::-1]  # pairs (coarse, fine) going up
        self.ups = nn.ModuleList(nn.ConvTranspose2d(cl, cu, 2, stride=2) for cl, cu in zip(lower, upper, strict=True))
        self.decoder = nn.ModuleList(ResBlock(2 * cu, cu, **block) for cu in upper)
        self.out = _conv3(channels[0], c_img, pad)

    def backbone(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                h = self.pool(h)
            h = block(h, emb)
            skips.append(h)
        for up, block, skip in zip(self.ups, self.decoder, skips[-2::-1], strict=True):
            h = _match(up(h), skip)
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(F.relu(h))


class SmallUNetDenoiser(NetDenoiser):
    """ambrogioni App. F.3 UNet: 3×3 conv in; per stage a residual block then a stride-2 conv; two bottleneck
    blocks; decoder of upsample + skip concatenation + residual block; GroupNorm → SiLU → 3×3 conv out."""

    name = "unet-small"

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], emb_dim: int, groups: int,
                 **common: Any) -> None:
        super().__init__(image_shape, emb_dim, **common)
        _check_min_size(self.image_shape, len(channels) + 1, self.name)
        c_img, pad = self.image_shape[0], self.padding
        block = dict(emb_dim=emb_dim, padding=pad, groups=groups, activation=nn.SiLU)
        self.inp = _conv3(c_img, channels[0], pad)
        cins = [channels[0], *channels[:-1]]
        self.encoder = nn.ModuleList(ResBlock(ci, co, **block) for ci, co in zip(cins, channels, strict=True))
        self.downs = nn.ModuleList(_conv3(c, c, pad, stride=2) for c in channels)
        c_mid = channels[-1]
        self.middle = nn.ModuleList([ResBlock(c_mid, c_mid, **block), ResBlock(c_mid, c_mid, **block)])
        decoder, c_in = [], c_mid
        for c_skip in channels[::-1]:
            decoder.append(ResBlock(c_in + c_skip, c_skip, **block))
            c_in = c_skip
        self.decoder = nn.ModuleList(decoder)
        self.out_norm = nn.GroupNorm(_group_count(channels[0], groups), channels[0])
        self.out = _conv3(channels[0], c_img, pad)

    def backbone(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = []
        for block, down in zip(self.encoder, self.downs, strict=True):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        for block in self.middle:
            h = block(h, emb)
        for block, skip in zip(self.decoder, skips[::-1], strict=True):
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


# ---- plain ConvNet (eft-information-spreading) ------------------------------------------------------------

class ConvNetDenoiser(NetDenoiser):
    """`depth` 3×3 conv + SiLU layers at `width` channels (first maps the image in), then a 3×3 conv out; the
    embedding is added before each hidden conv. Formal RF: 1 + 2·(depth + 1)."""

    name = "convnet"

    def __init__(self, image_shape: tuple[int, int, int], width: int, depth: int, emb_dim: int,
                 **common: Any) -> None:
        super().__init__(image_shape, emb_dim, **common)
        c_img = self.image_shape[0]
        self.depth = depth
        self.inp = _conv3(c_img, width, self.padding)
        self.layers = nn.ModuleList(_conv3(width, width, self.padding) for _ in range(depth - 1))
        self.projections = nn.ModuleList(nn.Linear(emb_dim, width) for _ in range(depth - 1))
        self.out = _conv3(width, c_img, self.padding)

    def backbone(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inp(x))
        for conv, proj in zip(self.layers, self.projections, strict=True):
            h = F.silu(conv(h + _broadcast(proj(emb))))
        return self.out(h)

    @property
    def formal_receptive_field(self) -> int:
        return 1 + 2 * (self.depth + 1)


ARCHITECTURES: dict[str, type[NetDenoiser]] = {
    "resnet": ResNetDenoiser, "unet": UNetDenoiser, "unet-small": SmallUNetDenoiser, "convnet": ConvNetDenoiser,
}


# ---- building from options and from a saved config --------------------------------------------------------

def resolve_options(arch: str, preset: str = "paper", padding: str = "zeros", conditional: bool = False,
                    schedule: str = "cosine", **overrides: Any) -> dict[str, Any]:
    """The full architecture options of `arch`: a preset's sizes with `overrides` (e.g. width=32) applied."""
    presets = PRESETS[arch]
    if preset not in presets:
        raise ModelConfigError(f"unknown preset '{preset}' for {arch}; available: {', '.join(presets)}")
    unknown = sorted(set(overrides) - set(presets[preset]))
    if unknown:
        raise ModelConfigError(f"unknown option(s) {', '.join(unknown)} for {arch}; "
                               f"size options: {', '.join(presets[preset])}; also preset, padding, "
                               f"conditional, schedule")
    if padding not in PADDINGS:
        raise ModelConfigError(f"padding must be one of {', '.join(PADDINGS)}, got '{padding}'"
                               f"{closest(str(padding), PADDINGS)}")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ModelConfigError(f"schedule must be one of {', '.join(sorted(SCHEDULES))} (a name, so that the "
                               f"net can be saved), got {schedule!r}{closest(str(schedule), SCHEDULES)}")
    sizes = {**presets[preset], **overrides}
    for key, value in sizes.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(int(v) != v or v < 1 for v in values):
            raise ModelConfigError(f"{arch} option {key} must be positive integer(s), got {value!r}")
    if sizes["emb_dim"] % 2:
        raise ModelConfigError(f"emb_dim must be even (sin and cos halves), got {sizes['emb_dim']}")
    return {"preset": preset, "padding": padding, "conditional": bool(conditional), "schedule": schedule,
            **{k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in sizes.items()}}


def check_net_fits(arch: str, image_shape: tuple[int, int, int], kwargs: dict[str, Any]) -> None:
    """Refuse a net whose weights (plus Adam's two moments and a gradient: ×4) would not fit in free memory;
    the count is exact: the net is first built on the meta device, which allocates nothing."""
    from ..engine.memory import check_fits

    with torch.device("meta"):
        shadow = ARCHITECTURES[arch](image_shape, **kwargs)
    count = sum(p.numel() for p in shadow.parameters())
    check_fits(4.0 * 4 * count, "cpu", f"a {arch} with {count:,} parameters (width {kwargs.get('width')})",
               "choose a smaller width / depth / preset")


def build_net(arch: str, image_shape: tuple[int, int, int], num_classes: int = 0, **options: Any) -> NetDenoiser:
    """A freshly initialized net of architecture `arch` for images [C, H, W] (options as in `resolve_options`)."""
    if arch not in ARCHITECTURES:
        raise ModelConfigError(f"unknown architecture '{arch}'; available: {', '.join(ARCHITECTURES)}")
    resolved = resolve_options(arch, **options)
    if resolved["conditional"] and num_classes < 1:
        raise ModelConfigError(f"a conditional {arch} needs labelled data (num_classes ≥ 1), got {num_classes}")
    config = {"name": arch, "image_shape": [int(s) for s in image_shape], "num_classes": int(num_classes),
              **resolved}
    kwargs = {k: v for k, v in config.items() if k not in ("name", "preset", "image_shape")}
    check_net_fits(arch, tuple(config["image_shape"]), kwargs)
    model = ARCHITECTURES[arch](tuple(config["image_shape"]), **kwargs)
    model.config = config
    return model


def net_from_config(config: dict[str, Any]) -> NetDenoiser:
    """Rebuild an (untrained) net from its `config` (as saved next to its weights)."""
    config = dict(config)
    arch = config.pop("name", None)
    try:
        image_shape = tuple(config.pop("image_shape"))
        num_classes = int(config.pop("num_classes", 0))
    except KeyError as exc:
        raise ModelConfigError(f"net config lacks {exc}; got keys {sorted(config)}") from None
    return build_net(str(arch), image_shape, num_classes, **config)


def _builder(arch: str):
    def build(data: ImageSet, preset: str = "paper", padding: str = "zeros", conditional: bool = False,
              schedule: str = "cosine", image_shape: list[int] | None = None, num_classes: int | None = None,
              **sizes: Any) -> NetDenoiser:
        # image_shape / num_classes are accepted so that make(name, data, **model.config) rebuilds a net;
        # they must agree with the data
        shape = (data.channels, data.height, data.width)
        if image_shape is not None and tuple(image_shape) != shape:
            raise ModelConfigError(f"config image_shape {tuple(image_shape)} differs from the data's {shape}")
        classes = data.num_classes if conditional else 0
        if num_classes is not None and int(num_classes) != classes:
            raise ModelConfigError(f"config num_classes {num_classes} differs from the data's {classes}")
        return build_net(arch, shape, classes, preset=preset,
                         padding=padding, conditional=conditional, schedule=schedule, **sizes)

    build.__doc__ = (f"sf.models.make('{arch}', data, preset='paper'|'small'|'tiny', padding='zeros'|'circular', "
                     f"conditional=False, schedule='cosine', **sizes): an untrained {arch} shaped for data.")
    return build


for _arch in ARCHITECTURES:
    register_model(_arch)(_builder(_arch))
