"""Effective field theory of the equivariant local score machine (EFT paper, eft-information-spreading.txt).

The ELS machine (shared circular bank; `sf.models.make("els", data, patch_size=P)`) denoises with
x̂₀(x) = Σ_j π_j(φ_Ωx) ϕ_j(0), log π_j = −‖φ_Ωx − √ᾱ ϕ_j‖²/2(1−ᾱ) + log w_j − log Z, and its score is
M = (√ᾱ x̂₀ − φ)/(1−ᾱ) (eq. 2, 13). Around a constant field c (c = 0 in the paper) its derivative expansion
(App. A.2, eq. 17) reads, with δφ = φ − c, δ = y − x the patch offsets and μ, ν = 0 (rows, image axis −2),
1 (columns, axis −1):

    x̂₀ = d00 + d10 δφ + d11^μ ∂_μφ + d12^{μν} ∂_μ∂_νφ + …          (the denoiser)
    M   = a00 + a10 δφ + a11^μ ∂_μφ + a12^{μν} ∂_μ∂_νφ + …          (the score, eq. 17)

Every coefficient is a sum over the patch bank (eq. 22–32). With the bank weights at the field c,
π_j ∝ w_j exp((√ᾱ/(1−ᾱ)) c·Σ_y ϕ_j(y) − ᾱ‖ϕ_j‖²/2(1−ᾱ)) (b00 of eq. 22 times the multiplicity), the linear
kernel of the denoiser is a covariance over the bank,

    K_{cc'}(δ) = ∂x̂₀_c(x)/∂φ_{c'}(x+δ) = √ᾱ/(1−ᾱ) · Cov_π(ϕ_c(0), ϕ_{c'}(δ)),

and its moments are the coefficients: d00 = E_π ϕ(0), d10 = Σ_δ K(δ), d11^μ = Σ_δ K(δ) δ^μ,
d12^{μν} = ½ Σ_δ K(δ) δ^μ δ^ν; the score's follow from M = (√ᾱ x̂₀ − φ)/(1−ᾱ):
a00 = (√ᾱ d00 − c)/(1−ᾱ) (eq. 29), a10 = (√ᾱ d10 − 1)/(1−ᾱ) (eq. 30), a11 = √ᾱ d11/(1−ᾱ) (eq. 31),
a12 = √ᾱ d12/(1−ᾱ) (eq. 32).

Readings of the paper (App. A.2; derived here, checked against autograd in tests/test_eft.py):
- eq. 15, 21, 22 read exp[−(1−ᾱ)⁻¹ Σ_y (φ(y) − √ᾱ ϕ(y))²]; the Gaussian N(·|√ᾱϕ, (1−ᾱ)I) of eq. 2 and 14 has
  exp[−Σ_y (φ(y) − √ᾱ ϕ(y))² / 2(1−ᾱ)]. Eq. 23 and 24 follow the printed exponent, so they are twice the
  correct b11 = b00 √ᾱ/(1−ᾱ) Σ_y δ^μ ϕ(y) and b12 = b00 √ᾱ/2(1−ᾱ) Σ_y δ^μ δ^ν ϕ(y) (and b10, not written, likewise).
- eq. 27 reads [a]_c = a(ϕ) − Z⁻¹ Σ_ϕ' a(ϕ'); expanding the ratio (14) gives
  [a]_c = a(ϕ) − b00(ϕ) Z⁻¹ Σ_ϕ' a(ϕ') (the subtracted mean carries the weight b00(ϕ)); only then is eq. 28
  right and do eq. 30–32 reduce to the covariances above.
- eq. 26: its left side is the sum Σ_ϕ' N(φ_Ωx|√ᾱϕ', (1−ᾱ)I), and its b10 term needs the same Σ_ϕ'.
- the closing remark "a12^{μν} = δ^{μν}" means a12^{μν} ∝ δ^{μν}; 90° rotations already force it (and a11 = 0).
- beyond the paper: with the full circular bank, a11 vanishes at leading order in ᾱ for any data (the uniform
  bank covariance is even in δ); only the b00 reweighting makes a11 = O(ᾱ^{3/2}) without a symmetry.
- eq. 1 (and so eq. 11) lacks a factor ½: the probability-flow ODE of the VP process is
  ∂φ/∂t = (∂_tᾱ/2ᾱ)[φ + M] (γ_t = −½ d log ᾱ/dt, `schedules`, `convert.drift_from_x0`); `flow_coefficients`
  uses it.

App. A.3 (the heat equation from white noise) is `heat_equation_two_point` (continuum, eq. 41 corrected),
`lattice_heat_two_point` (exact lattice propagator), `simulate_heat_equation` and `empirical_two_point`.
The EFT as a runnable denoiser is `EFTDenoiser` / `eft_model`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import ImageSet
from ..engine import (
    StreamedPatches,
    centre_columns,
    check_padding,
    check_patch_size,
    extract_patches,
    group_layout,
)
from ..models.base import Denoiser
from ..models.machines import PatchMachine

Tensor = torch.Tensor
F64 = torch.float64

COEFFICIENT_KEYS = ("d00", "d10", "d11", "d12", "a00", "a10", "a11", "a12")
DEFAULT_MEMORY_BUDGET = 2**28          # bytes a streamed bank chunk may take (eft_coefficients)
DEFAULT_WAVENUMBER = 1e-2              # plane waves of `linearize`
OPERATORS = ("derivatives", "kernel")  # what `EFTDenoiser` applies


class EFTError(ValueError):
    """Invalid input to the EFT analysis (ᾱ, patch size, shapes, sources)."""


# ---- inputs --------------------------------------------------------------------------------------------------

def _alpha_bars(alpha_bar: Any, allow_zero: bool = False) -> tuple[Tensor, bool]:
    """(ᾱ [A] float64, whether the input was a scalar). ᾱ must lie in (0, 1) ([0, 1) with allow_zero)."""
    try:
        ab = torch.as_tensor(alpha_bar, dtype=F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EFTError(f"alpha_bar must be a float or a 1-D tensor, got {alpha_bar!r}") from exc
    scalar = ab.ndim == 0
    ab = ab.reshape(1) if scalar else ab
    if ab.ndim != 1 or ab.numel() == 0:
        raise EFTError(f"alpha_bar must be a float or a non-empty 1-D tensor, got shape {tuple(ab.shape)}")
    low_ok = (ab >= 0) if allow_zero else (ab > 0)
    if not torch.isfinite(ab).all() or not low_ok.all() or not (ab < 1).all():
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise EFTError(f"alpha_bar must lie in {interval}, got {ab.tolist()}")
    return ab, scalar


def _background(background: Any, channels: int) -> Tensor:
    """The constant field c the expansion is taken around: a float or one value per channel → [C] float64."""
    c = torch.as_tensor(background, dtype=F64).detach().cpu().reshape(-1)
    if c.numel() == 1:
        c = c.expand(channels).clone()
    if c.shape != (channels,) or not torch.isfinite(c).all():
        raise EFTError(f"background must be a finite float or {channels} values (one per channel), got "
                       f"{background!r}")
    return c


def _patch_size(patch_size: Any, height: int, width: int) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
        raise EFTError(f"patch_size must be an odd positive integer, got {patch_size!r}")
    if patch_size > min(height, width):
        raise EFTError(f"patch_size {patch_size} exceeds the {height}×{width} image: the offsets δ of a patch "
                       "that wraps around the torus more than once have no derivative expansion")
    return check_patch_size(patch_size)


@dataclass
class BankSpec:
    """The shared ELS bank of one training set at one patch size (what App. A.2 sums over)."""

    images: Tensor            # [N, C, H, W] (float32 as the engine holds them; streamed as float64)
    log_weights: Tensor       # [N] log-multiplicity of each image's patches
    patch_size: int
    padding: str = "circular"
    valid_only: bool = False

    def stream(self, chunk_keys: int) -> StreamedPatches:
        _, _, h, w = self.images.shape
        locs = group_layout("shared", h, w, self.patch_size, self.valid_only)[0].key_locs   # [1, Lk]
        source = StreamedPatches(self.images, self.log_weights, self.patch_size, self.padding, locs)
        source.set_chunk_keys(chunk_keys)
        return source


def _machine_engine(machine: PatchMachine, label: int | None) -> Any:
    engine = machine.engines.get(label)[0]
    if engine.grouping != "shared":
        raise EFTError(f"the derivative expansion needs one translation-invariant bank (ELS, grouping 'shared'); "
                       f"'{machine.name}' uses grouping '{engine.grouping}'")
    return engine


def bank_specs(source: PatchMachine | ImageSet | Tensor, alpha_bar: Tensor, patch_size: int | None = None,
               padding: str = "circular", label: int | None = None) -> list[BankSpec]:
    """One `BankSpec` per ᾱ [A]: from an ELS machine (its engine's images, log-weights, padding and its patch
    size at each ᾱ) or from an ImageSet / images [N, C, H, W] with `patch_size`."""
    if isinstance(source, PatchMachine):
        if patch_size is not None:
            raise EFTError("patch_size comes from the machine; pass it only with an ImageSet")
        engine = _machine_engine(source, label)
        _, h, w = engine.image_shape
        sizes = [_patch_size(source.patch_size_at(float(v)), h, w) for v in alpha_bar]
        return [BankSpec(engine.images, engine.log_weights, p, engine.padding, engine.valid_only) for p in sizes]
    if isinstance(source, Denoiser):
        raise EFTError(f"eft_coefficients needs an ELS machine or an ImageSet, got the '{source.name}' denoiser "
                       "(use `linearize` for any differentiable denoiser)")
    images = source.images if isinstance(source, ImageSet) else source
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise EFTError(f"images must be an ImageSet or a [N>0, C, H, W] tensor, got "
                       f"{getattr(images, 'shape', type(images).__name__)}")
    if patch_size is None:
        raise EFTError("patch_size is required with an ImageSet")
    size = _patch_size(patch_size, images.shape[-2], images.shape[-1])
    try:
        padding = check_padding(padding)
    except ValueError as exc:
        raise EFTError(str(exc)) from exc
    weights = torch.zeros(images.shape[0], dtype=F64, device=images.device)
    spec = BankSpec(images.detach().to(torch.float32), weights, size, padding)
    return [spec] * alpha_bar.shape[0]


# ---- App. A.2: the coefficients as sums over the bank ---------------------------------------------------------

def offsets(patch_size: int) -> Tensor:
    """Patch offsets δ [P, P, 2] (δ^0 = row offset dy, δ^1 = column offset dx), as `patch_index` lays them out."""
    r = patch_size // 2
    d = torch.arange(-r, r + 1, dtype=F64)
    return torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)


def kernel_moments(kernel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of a linear kernel K [..., P, P] over the offsets: (Σ K [...], Σ K δ^μ [..., 2],
    ½ Σ K δ^μ δ^ν [..., 2, 2]) — eq. 17 with φ(x+δ) expanded as in eq. 18."""
    delta = offsets(kernel.shape[-1]).to(kernel.device)                  # [P, P, 2]
    d10 = kernel.sum((-2, -1))
    d11 = torch.einsum("...ij,ijm->...m", kernel, delta)
    d12 = 0.5 * torch.einsum("...ij,ijm,ijn->...mn", kernel, delta, delta)
    return d10, d11, d12


def _chunk_keys(dim: int, channels: int, n_alpha: int, memory_budget: float) -> int:
    # per key: the gathered, permuted and float64 patches (≈ 4·D), logits and weights (2·A), p ⊗ centre (A·C)
    per_key = 8 * (4 * dim + 2 * n_alpha + n_alpha * channels + 2)
    return max(1, int(memory_budget // per_key))


def bank_moments(spec: BankSpec, alpha_bar: Tensor, background: Tensor,
                 memory_budget: float = DEFAULT_MEMORY_BUDGET) -> tuple[Tensor, Tensor]:
    """(d00 [A, C], kernel K [A, C, C, P, P]) of one bank at ᾱ [A] around the constant field c [C] (eq. 22–32).

    One streamed pass with an exact running log-sum-exp per ᾱ, so memory is bounded by `memory_budget`
    whatever the bank size: log π_j = (√ᾱ/(1−ᾱ)) c·Σ_y ϕ_j(y) − ᾱ‖ϕ_j‖²/2(1−ᾱ) + log w_j (b00 of eq. 22 with
    the Gaussian's ½ restored), d00 = E_π ϕ(0), K = √ᾱ/(1−ᾱ) Cov_π(ϕ(0), ϕ(δ))."""
    n, c, _, _ = spec.images.shape
    p = spec.patch_size
    dim = c * p * p
    a, s2 = alpha_bar.sqrt(), 1 - alpha_bar                                # [A]
    lin, quad = a / s2, alpha_bar / (2 * s2)                             # [A]
    cvec = background.repeat_interleave(p * p).to(spec.images.device)    # [D] channel-major like the keys
    centre = centre_columns(c, p).to(spec.images.device)                 # [C]
    lin, quad = lin.to(spec.images.device), quad.to(spec.images.device)
    n_ab = alpha_bar.shape[0]
    top = torch.full((n_ab,), -math.inf, dtype=F64, device=spec.images.device)
    s0 = torch.zeros(n_ab, dtype=F64, device=spec.images.device)
    s_c = torch.zeros(n_ab, c, dtype=F64, device=spec.images.device)
    s_p = torch.zeros(n_ab, dim, dtype=F64, device=spec.images.device)
    s_cp = torch.zeros(n_ab, c, dim, dtype=F64, device=spec.images.device)
    source = spec.stream(_chunk_keys(dim, c, n_ab, memory_budget))
    for _, keys, logw, _ in source.chunks(F64):
        keys, logw = keys[0], logw[0]                                    # [K, D], [K]
        logits = (lin[:, None] * (keys @ cvec)[None] - quad[:, None] * (keys * keys).sum(-1)[None]
                  + logw[None])                                          # [A, K]
        new_top = torch.maximum(top, logits.max(1).values)
        scale = torch.exp(top - new_top)                                 # 0 on the first chunk
        w = torch.exp(logits - new_top[:, None])                         # [A, K]
        cen = keys[:, centre]                                            # [K, C]
        s0 = s0 * scale + w.sum(1)
        s_c = s_c * scale[:, None] + w @ cen
        s_p = s_p * scale[:, None] + w @ keys
        s_cp = s_cp * scale[:, None, None] + (w[:, :, None] * cen[None]).transpose(1, 2) @ keys   # [A, C, D]
        top = new_top
    mean_c, mean_p = s_c / s0[:, None], s_p / s0[:, None]               # [A, C], [A, D]
    cov = s_cp / s0[:, None, None] - mean_c[:, :, None] * mean_p[:, None, :]    # [A, C, D]
    kernel = (lin[:, None, None] * cov).reshape(n_ab, c, c, p, p)
    return mean_c.cpu(), kernel.cpu()


def score_coefficients(d: dict[str, Tensor], alpha_bar: Tensor, background: Tensor) -> dict[str, Tensor]:
    """The score's a00, a10, a11, a12 (eq. 17, 29–32) from the denoiser's d** via M = (√ᾱ x̂₀ − φ)/(1−ᾱ).
    alpha_bar [A], background [C]; d00 [A, C], d10 [A, C, C], d11 [A, C, C, 2], d12 [A, C, C, 2, 2]."""
    a, s2 = alpha_bar.sqrt(), 1 - alpha_bar
    eye = torch.eye(d["d10"].shape[-1], dtype=F64)
    return {"a00": (a[:, None] * d["d00"] - background[None]) / s2[:, None],
            "a10": (a[:, None, None] * d["d10"] - eye) / s2[:, None, None],
            "a11": (a / s2)[:, None, None, None] * d["d11"],
            "a12": (a / s2)[:, None, None, None, None] * d["d12"]}


def _pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """A kernel [..., P, P] zero-padded (centred) to [..., size, size]."""
    pad = (size - kernel.shape[-1]) // 2
    return torch.nn.functional.pad(kernel, (pad, pad, pad, pad)) if pad else kernel


def _assemble(alpha_bar: Tensor, background: Tensor, d00: Tensor, kernels: list[Tensor],
              sizes: list[int], scalar: bool) -> dict[str, Any]:
    size = max(sizes)
    kernel = torch.stack([_pad_kernel(k, size) for k in kernels])         # [A, C, C, P, P]
    d10, d11, d12 = kernel_moments(kernel)
    out: dict[str, Any] = {"alpha_bar": alpha_bar, "background": background,
                           "patch_size": torch.tensor(sizes, dtype=torch.int64), "kernel": kernel,
                           "d00": d00, "d10": d10, "d11": d11, "d12": d12}
    out.update(score_coefficients(out, alpha_bar, background))
    return _squeeze(out) if scalar else out


def _squeeze(coeffs: dict[str, Any]) -> dict[str, Any]:
    """Drop the leading ᾱ axis (a scalar ᾱ was asked for); `background` has none."""
    return {k: (v[0] if isinstance(v, Tensor) and k != "background" else v) for k, v in coeffs.items()}


def eft_coefficients(machine_or_bank: PatchMachine | ImageSet | Tensor, alpha_bar: float | Tensor,
                     patch_size: int | None = None, *, background: float | Sequence[float] = 0.0,
                     padding: str = "circular", label: int | None = None,
                     memory_budget: float = DEFAULT_MEMORY_BUDGET) -> dict[str, Tensor]:
    """Coefficients of the ELS derivative expansion (App. A.2, eq. 17, 22–32) as sums over the patch bank.

    machine_or_bank: an ELS machine (`sf.models.make("els", data, patch_size=P)`; its bank, log-weights,
    padding and patch size at each ᾱ; `label` picks a conditional machine's class) or an ImageSet / images
    [N, C, H, W] with `patch_size` (odd, at most the image size) and `padding`. alpha_bar: a float or [A] in
    (0, 1). background: the constant field c expanded around (float or [C]; the paper's c = 0).

    Returns float64 tensors, over [A] (no ᾱ axis for a float ᾱ): "d00" [A, C] (x̂₀ at φ = c),
    "d10" [A, C, C] (out channel, in channel), "d11" [A, C, C, 2] (μ = 0 rows, 1 columns),
    "d12" [A, C, C, 2, 2] (the denoiser's coefficients), "a00" … "a12" the same for the score M (eq. 17),
    "kernel" [A, C, C, P, P] the linear kernel K(δ) = ∂x̂₀(x)/∂φ(x+δ) they are the moments of,
    "alpha_bar" [A], "patch_size" [A], "background" [C]. The bank is streamed in chunks within memory_budget
    bytes (an MNIST-sized bank of 50,000·784 patches included).
    """
    ab, scalar = _alpha_bars(alpha_bar)
    return _coefficients(machine_or_bank, ab, scalar, patch_size, background, padding, label, memory_budget)


def _coefficients(source: Any, ab: Tensor, scalar: bool, patch_size: int | None, background: Any,
                  padding: str, label: int | None, memory_budget: float) -> dict[str, Any]:
    specs = bank_specs(source, ab, patch_size, padding, label)
    c = _background(background, specs[0].images.shape[1])
    d00 = torch.zeros(ab.shape[0], c.shape[0], dtype=F64)
    kernels: list[Tensor | None] = [None] * ab.shape[0]
    for size in sorted({s.patch_size for s in specs}):                  # one pass per patch size
        rows = [i for i, s in enumerate(specs) if s.patch_size == size]
        mean, kernel = bank_moments(specs[rows[0]], ab[rows], c, memory_budget)
        d00[rows] = mean
        for j, i in enumerate(rows):
            kernels[i] = kernel[j]
    return _assemble(ab, c, d00, kernels, [s.patch_size for s in specs], scalar)


def flow_coefficients(coeffs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Coefficients of ∂φ/∂ᾱ = (φ + M)/(2ᾱ) (eq. 1 with its missing ½ restored; eq. 3 in ᾱ-time):
    g00 = a00/2ᾱ, g10 = (1 + a10)/2ᾱ, g11 = a11/2ᾱ (eq. 3's g2 v2), g12 = a12/2ᾱ (eq. 3's g3 M3, eq. 9's c3 δ^{μν}
    for isotropic data). As ᾱ → 0, g12 → ¼ Σ_δ C(δ) δ^μ δ^ν with C the bank's uniform-weight patch covariance."""
    two_ab = 2 * coeffs["alpha_bar"].to(F64)                            # [A] (or a scalar)

    def per(t: Tensor) -> Tensor:
        return t / two_ab.reshape(*two_ab.shape, *([1] * (t.ndim - two_ab.ndim)))

    eye = torch.eye(coeffs["a10"].shape[-1], dtype=F64)
    return {"g00": per(coeffs["a00"]), "g10": per(coeffs["a10"] + eye), "g11": per(coeffs["a11"]),
            "g12": per(coeffs["a12"])}


# ---- the same coefficients from the machine's own output (autograd) -----------------------------------------

def _machine_patch_size(machine: Denoiser, ab: Tensor, patch_size: int | None) -> int:
    if patch_size is not None:
        return check_patch_size(patch_size)
    if hasattr(machine, "patch_size_at"):
        return max(int(machine.patch_size_at(float(v))) for v in ab)
    if isinstance(getattr(machine, "patch_size", None), int):
        return machine.patch_size
    raise EFTError(f"cannot tell the receptive field of '{machine.name}': pass patch_size")


def linearize(machine: Denoiser, alpha_bar: float | Tensor, *, background: float | Sequence[float] = 0.0,
              wavenumber: float = DEFAULT_WAVENUMBER, patch_size: int | None = None,
              label: int | None = None) -> dict[str, Any]:
    """The derivative-expansion coefficients read off the machine's own output by autograd (float64), around
    the constant field c at ᾱ (a float or [A] in (0, 1)); any differentiable local denoiser.

    - d00 = x̂₀(c), d10 = the response (jvp) to a constant perturbation (eq. 17's a00 + a10·δc);
    - d11^μ from the O(k) response to sin(k(x_μ − x*_μ)), d12^{μμ} from the O(k²) response to cos(k(x_μ − x*_μ))
      and d12^{01} from cos(k(δ0 + δ1)) — plane waves of small wavenumber k read at the centre pixel x*
      (the machine sees only the patch around x*, so k need not be a lattice momentum);
    - "kernel" [A, C, C, P, P] the exact Jacobian row ∂x̂₀(x*)/∂φ(x*+δ) (one backward pass per channel),
      "outside" the largest |∂x̂₀(x*)/∂φ(y)| for y outside the patch (0 for a local machine).

    "truncation" holds rigorous bounds on the plane-wave estimates' error from dropping O(k³): with
    |sin u − u| ≤ |u|³/6 and |cos u − 1 + u²/2| ≤ u⁴/24, |d11^μ_est − d11^μ| ≤ (k²/6) Σ_δ |K(δ)| |δ^μ|³ and
    |d12^{μμ}_est − d12^{μμ}| ≤ (k²/24) Σ_δ |K(δ)| (δ^μ)⁴ (d12^{01}: half the sum of the three bounds it is
    built from), plus a float64 rounding allowance. Returns the keys of `eft_coefficients`.
    """
    ab, scalar = _alpha_bars(alpha_bar)
    c_in, h, w = machine.image_shape
    c = _background(background, c_in)
    if not (isinstance(wavenumber, (int, float)) and 0 < wavenumber < 1):
        raise EFTError(f"wavenumber must be a float in (0, 1), got {wavenumber!r}")
    size = _machine_patch_size(machine, ab, patch_size)
    r = size // 2
    ys, xs = h // 2, w // 2                                              # x*: the centre pixel
    if r > min(h - 1 - ys, w - 1 - xs):
        raise EFTError(f"the {size}×{size} patch around the centre of a {h}×{w} image reaches the seam of the "
                       "plane waves; use a larger image or a smaller patch")
    n_ab = ab.shape[0]
    base = c.reshape(1, c_in, 1, 1).expand(n_ab, c_in, h, w).contiguous()  # x: [A, C, H, W]
    labels = None if label is None else torch.full((n_ab,), int(label), dtype=torch.int64)

    def f(x: Tensor) -> Tensor:
        return machine(x, ab, labels)

    kernel, outside = _jacobian_row(f, base, (ys, xs), r)
    with torch.no_grad():
        d00 = f(base)[:, :, ys, xs]                                       # [A, C]
    k = float(wavenumber)
    y = torch.arange(h, dtype=F64)[:, None] - ys                          # [H, 1]
    x = torch.arange(w, dtype=F64)[None, :] - xs                          # [1, W]
    waves = {"const": torch.ones(h, w, dtype=F64), "sin0": torch.sin(k * y).expand(h, w),
             "sin1": torch.sin(k * x).expand(h, w), "cos0": torch.cos(k * y).expand(h, w),
             "cos1": torch.cos(k * x).expand(h, w), "diag": torch.cos(k * (y + x))}
    resp = _responses(machine, base, ab, labels, waves, (ys, xs))         # each [A, C, C]
    d10 = resp["const"]
    d11 = torch.stack([resp["sin0"] / k, resp["sin1"] / k], -1)
    diag = [(d10 - resp["cos0"]) / k**2, (d10 - resp["cos1"]) / k**2]
    cross = 0.5 * ((d10 - resp["diag"]) / k**2 - diag[0] - diag[1])
    d12 = torch.stack([torch.stack([diag[0], cross], -1), torch.stack([cross, diag[1]], -1)], -2)
    out: dict[str, Any] = {"alpha_bar": ab, "background": c, "patch_size": torch.full((n_ab,), size),
                           "kernel": kernel, "outside": outside, "d00": d00, "d10": d10, "d11": d11, "d12": d12,
                           "truncation": _truncation(kernel, k)}
    out.update(score_coefficients(out, ab, c))
    if scalar:
        out = _squeeze(out)
        out["truncation"] = {key: v[0] for key, v in out["truncation"].items()}
    return out


def _responses(machine: Denoiser, base: Tensor, ab: Tensor, labels: Tensor | None, waves: dict[str, Tensor],
               at: tuple[int, int]) -> dict[str, Tensor]:
    """{name: [A, C_out, C_in]}: the machine's linear response (one jvp) at `base` [A, C, H, W] to each wave
    [H, W] put on one input channel, read at the pixel `at`. All M·C directions go in one batch of M·C·A."""
    n_ab, channels = base.shape[:2]
    dirs = []                                                            # [M·C] × [A, C, H, W]
    for wave in waves.values():
        for ci in range(channels):
            v = torch.zeros_like(base)
            v[:, ci] = wave
            dirs.append(v)
    reps = len(dirs)
    big_ab = ab.repeat(reps)
    big_labels = None if labels is None else labels.repeat(reps)

    def f(x: Tensor) -> Tensor:
        return machine(x, big_ab, big_labels)

    x = base.repeat(reps, 1, 1, 1).requires_grad_(True)
    _, jv = torch.autograd.functional.jvp(f, x, torch.cat(dirs))
    jv = jv.detach()[:, :, at[0], at[1]].reshape(len(waves), channels, n_ab, channels)   # [M, C_in, A, C_out]
    return {name: jv[m].permute(1, 2, 0) for m, name in enumerate(waves)}


def _jacobian_row(f: Callable[[Tensor], Tensor], base: Tensor, at: tuple[int, int],
                  r: int) -> tuple[Tensor, Tensor]:
    """(K [A, C_out, C_in, 2r+1, 2r+1] = ∂f(x)_{c}(at)/∂x_{c'}(at + δ), max |∂f(at)/∂x| outside the window [A])."""
    ys, xs = at
    x = base.clone().requires_grad_(True)
    out = f(x)
    rows, outside = [], torch.zeros(base.shape[0], dtype=F64)
    for co in range(base.shape[1]):
        (grad,) = torch.autograd.grad(out[:, co, ys, xs].sum(), x, retain_graph=co + 1 < base.shape[1])
        grad = grad.detach().to(F64)                                     # [A, C_in, H, W]
        window = grad[:, :, ys - r:ys + r + 1, xs - r:xs + r + 1].clone()
        rest = grad.clone()
        rest[:, :, ys - r:ys + r + 1, xs - r:xs + r + 1] = 0
        outside = torch.maximum(outside, rest.abs().flatten(1).max(1).values)
        rows.append(window)
    return torch.stack(rows, 1), outside


def _truncation(kernel: Tensor, k: float) -> dict[str, Tensor]:
    """Bounds on the plane-wave estimates' truncation error (see `linearize`), [A, C, C, 2] and [A, C, C, 2, 2]."""
    delta = offsets(kernel.shape[-1])                                     # [P, P, 2]
    mag = kernel.abs()

    def moment(power_of: Tensor) -> Tensor:
        return torch.einsum("...ij,ij->...", mag, power_of)

    rounding = 64 * torch.finfo(F64).eps * mag.sum((-2, -1)) / k**2     # [A, C, C]
    e11 = torch.stack([moment(delta[..., m].abs() ** 3) for m in range(2)], -1) * k**2 / 6
    e_diag = [moment(delta[..., m] ** 4) * k**2 / 24 + rounding for m in range(2)]
    e_mix = moment((delta[..., 0] + delta[..., 1]) ** 4) * k**2 / 24 + rounding
    e_cross = 0.5 * (e_mix + e_diag[0] + e_diag[1])
    e12 = torch.stack([torch.stack([e_diag[0], e_cross], -1), torch.stack([e_cross, e_diag[1]], -1)], -2)
    return {"d11": e11 + rounding[..., None] * k, "d12": e12}


# ---- the EFT as a denoiser -----------------------------------------------------------------------------------

def lattice_derivatives(x: Tensor) -> tuple[Tensor, Tensor]:
    """Circular central differences of x [B, C, H, W]: (∂_μ x [B, C, 2, H, W], ∂_μ∂_ν x [B, C, 2, 2, H, W]),
    μ = 0 along rows (axis −2), 1 along columns (axis −1); exact on quadratics."""
    def shift(t: Tensor, dy: int, dx: int) -> Tensor:                   # t(x + (dy, dx)) on the torus
        return torch.roll(t, shifts=(-dy, -dx), dims=(-2, -1))

    grad = torch.stack([(shift(x, 1, 0) - shift(x, -1, 0)) / 2, (shift(x, 0, 1) - shift(x, 0, -1)) / 2], 2)
    d00 = shift(x, 1, 0) - 2 * x + shift(x, -1, 0)
    d11 = shift(x, 0, 1) - 2 * x + shift(x, 0, -1)
    d01 = (shift(x, 1, 1) - shift(x, 1, -1) - shift(x, -1, 1) + shift(x, -1, -1)) / 4
    hess = torch.stack([torch.stack([d00, d01], 2), torch.stack([d01, d11], 2)], 2)
    return grad, hess


def apply_eft(x: Tensor, coeffs: dict[str, Tensor], order: int = 2) -> Tensor:
    """x̂₀ = d00 + d10 (x − c) + d11^μ ∂_μx + d12^{μν} ∂_μ∂_νx (eq. 17 for the denoiser, truncated at `order`
    derivatives) with lattice finite differences. x: [B, C, H, W]; coefficients per sample: d00 [B, C],
    d10 [B, C, C], d11 [B, C, C, 2], d12 [B, C, C, 2, 2], background [C]. Float64 in, float64 out."""
    c = coeffs["background"].to(x.device).reshape(1, -1, 1, 1)
    dev = {k: coeffs[k].to(x.device) for k in ("d00", "d10", "d11", "d12")}
    out = dev["d00"][:, :, None, None] + torch.einsum("bij,bjhw->bihw", dev["d10"], x - c)
    if order >= 1:
        grad, hess = lattice_derivatives(x)
        out = out + torch.einsum("bijm,bjmhw->bihw", dev["d11"], grad)
        if order >= 2:
            out = out + torch.einsum("bijmn,bjmnhw->bihw", dev["d12"], hess)
    return out


def apply_kernel(x: Tensor, coeffs: dict[str, Tensor]) -> Tensor:
    """x̂₀ = d00 + Σ_δ K(δ) (x(· + δ) − c): the machine linearized around c to all orders in derivatives (the
    circular convolution the derivative expansion truncates). x: [B, C, H, W]; d00 [B, C], kernel
    [B, C, C, P, P], background [C]."""
    b, c, h, w = x.shape
    kernel = coeffs["kernel"].to(x.device)
    size = kernel.shape[-1]
    shifted = x - coeffs["background"].to(x.device).reshape(1, -1, 1, 1)
    patches = extract_patches(shifted, size, "circular")                 # [B, HW, C·P·P] channel-major
    out = torch.einsum("bld,bcd->bcl", patches, kernel.reshape(b, c, -1)).reshape(b, c, h, w)
    return coeffs["d00"].to(x.device)[:, :, None, None] + out


class EFTDenoiser(Denoiser):
    """The EFT prediction as a denoiser: x̂₀ = d00 + d10(φ − c) + d11^μ ∂_μφ + d12^{μν} ∂_μ∂_νφ with circular
    finite differences (`apply_eft`), the coefficients a function of ᾱ. With it, x̂₀ is linear in the state,
    the probability-flow / DDIM update a linear (heat-equation-type, App. A.3) evolution, and
    `sf.sampling.sample(EFTDenoiser(...), noise, ...)` runs it from the same noise as the machine.
    It is an early-time (small ᾱ), long-wavelength description: d10 grows like √ᾱ/(1−ᾱ), so a whole reverse
    process blows up where the machine snaps (eq. 8); and on white noise the finite-difference stencil differs
    from the machine's kernel at the lattice scale (operator='kernel' keeps every derivative order).

    coefficients: ᾱ [U] (float64, distinct, in [0, 1)) → dict with d00 [U, C], d10 [U, C, C], d11 [U, C, C, 2],
    d12 [U, C, C, 2, 2], background [C] and, for operator='kernel', kernel [U, C, C, P, P] (`eft_model` builds
    it from a machine, a bank or a table). order: 0, 1 or 2 derivatives kept. operator: 'derivatives' (the EFT,
    `apply_eft`) or 'kernel' (the machine linearized to all orders in derivatives, `apply_kernel`: what the
    truncation is measured against)."""

    name = "eft"

    def __init__(self, image_shape: tuple[int, int, int], coefficients: Callable[[Tensor], dict[str, Tensor]],
                 order: int = 2, operator: str = "derivatives") -> None:
        if order not in (0, 1, 2):
            raise EFTError(f"order must be 0, 1 or 2, got {order!r}")
        if operator not in OPERATORS:
            raise EFTError(f"operator must be one of {OPERATORS}, got {operator!r}")
        if len(image_shape) != 3:
            raise EFTError(f"image_shape must be (C, H, W), got {image_shape!r}")
        super().__init__(image_shape, {"order": order, "operator": operator})
        self.coefficients, self.order, self.operator = coefficients, order, operator

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        ab, _ = _alpha_bars(alpha_bar, allow_zero=True)
        values, index = torch.unique(ab, return_inverse=True)
        coeffs = self.coefficients(values)
        keys = ("d00", "kernel") if self.operator == "kernel" else ("d00", "d10", "d11", "d12")
        per_sample = {k: coeffs[k][index.to(coeffs[k].device)] for k in keys}
        per_sample["background"] = coeffs["background"]
        if self.operator == "kernel":
            return apply_kernel(x.to(F64), per_sample).to(x.dtype)
        return apply_eft(x.to(F64), per_sample, self.order).to(x.dtype)


def _table(coeffs: dict[str, Tensor]) -> Callable[[Tensor], dict[str, Tensor]]:
    """Interpolation of coefficients tabulated on a grid coeffs["alpha_bar"] [A] (A ≥ 1), linear in √ᾱ (the
    coefficients start as √ᾱ·(…) at small ᾱ, so this is far closer than linear in ᾱ)."""
    grid_ab = torch.as_tensor(coeffs["alpha_bar"], dtype=F64).reshape(-1)
    order = torch.argsort(grid_ab)
    grid_ab = grid_ab[order]
    grid = grid_ab.sqrt()
    table = {k: torch.as_tensor(coeffs[k], dtype=F64).reshape(len(grid), *coeffs[k].shape[-_rank(k):])[order]
             for k in ("d00", "d10", "d11", "d12", "kernel") if k in coeffs}
    background = torch.as_tensor(coeffs["background"], dtype=F64)

    def lookup(alpha_bar: Tensor) -> dict[str, Tensor]:
        alpha_bar = alpha_bar.to(F64).cpu()
        if ((alpha_bar < grid_ab[0] - 1e-12) | (alpha_bar > grid_ab[-1] + 1e-12)).any():
            raise EFTError(f"alpha_bar {alpha_bar.tolist()} outside the tabulated range [{float(grid_ab[0])}, "
                           f"{float(grid_ab[-1])}]")
        ab = alpha_bar.sqrt()
        hi = torch.searchsorted(grid, ab).clamp(1, len(grid) - 1) if len(grid) > 1 else torch.zeros_like(
            ab, dtype=torch.int64)
        lo = (hi - 1).clamp_min(0)
        span = (grid[hi] - grid[lo]).clamp_min(1e-300)
        t = ((ab - grid[lo]) / span).clamp(0, 1) if len(grid) > 1 else torch.zeros_like(ab)
        out = {}
        for k, v in table.items():
            tt = t.reshape(-1, *([1] * (v.ndim - 1)))
            out[k] = (1 - tt) * v[lo] + tt * v[hi]
        out["background"] = background
        return out

    return lookup


def _rank(key: str) -> int:
    """Axes of one ᾱ's coefficient: d00 [C], d10 [C, C], d11 [C, C, 2], d12 [C, C, 2, 2], kernel [C, C, P, P]."""
    return {"d00": 1, "d10": 2, "d11": 3, "d12": 4, "kernel": 4}[key]


def eft_model(coefficients: Any, *, patch_size: int | None = None, image_shape: Sequence[int] | None = None,
              order: int = 2, operator: str = "derivatives", background: float | Sequence[float] = 0.0,
              padding: str = "circular", label: int | None = None,
              memory_budget: float = DEFAULT_MEMORY_BUDGET) -> EFTDenoiser:
    """The EFT denoiser (`EFTDenoiser`, `order` and `operator` as there) from
    - an ELS machine, or an ImageSet with `patch_size`: coefficients summed over the bank at each call's ᾱ;
    - a dict of `eft_coefficients` over a grid of ᾱ (tabulated once; interpolated linearly in √ᾱ, refused
      outside the grid): needs `image_shape` (C, H, W) — the fast route for large banks;
    - a callable ᾱ [U] → coefficient dict: needs `image_shape`."""
    if isinstance(coefficients, (PatchMachine, ImageSet)):
        source = coefficients
        shape = source.image_shape if isinstance(source, PatchMachine) else tuple(source.images.shape[1:])

        def from_bank(ab: Tensor) -> dict[str, Tensor]:
            return _coefficients(source, ab, False, patch_size, background, padding, label, memory_budget)

        bank_specs(source, torch.tensor([0.5], dtype=F64), patch_size, padding, label)   # validate now
        return EFTDenoiser(tuple(shape), from_bank, order, operator)
    if image_shape is None:
        raise EFTError("image_shape (C, H, W) is required with tabulated or callable coefficients")
    if isinstance(coefficients, dict):
        missing = [k for k in ("alpha_bar", "background", "d00", "d10", "d11", "d12") if k not in coefficients]
        if missing:
            raise EFTError(f"the coefficient table lacks {missing}")
        if operator == "kernel" and "kernel" not in coefficients:
            raise EFTError("operator='kernel' needs the table's 'kernel'")
        return EFTDenoiser(tuple(image_shape), _table(coefficients), order, operator)
    if callable(coefficients):
        return EFTDenoiser(tuple(image_shape), coefficients, order, operator)
    raise EFTError(f"eft_model needs an ELS machine, an ImageSet, a coefficient dict or a callable, got "
                   f"{type(coefficients).__name__}")


# ---- App. A.3: the heat equation from white noise -------------------------------------------------------------

def _check_heat(shape: Sequence[int], steps: int, dt: float, D: float, sigma: float) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise EFTError(f"shape must be a non-empty sequence of positive lattice sizes, got {shape!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise EFTError(f"steps must be a non-negative integer, got {steps!r}")
    for name, value in (("dt", dt), ("D", D), ("sigma", sigma)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise EFTError(f"{name} must be a positive number, got {value!r}")
    return shape


def laplacian_eigenvalues(shape: Sequence[int]) -> Tensor:
    """λ_k = Σ_μ (2 − 2 cos k_μ) [*shape], k_μ = 2π m_μ/L_μ: the eigenvalues of −Δ on the periodic lattice."""
    grids = torch.meshgrid(*[2 * math.pi * torch.arange(n, dtype=F64) / n for n in shape], indexing="ij")
    return sum(2 - 2 * torch.cos(g) for g in grids)


def _propagator(shape: Sequence[int], steps: int, dt: float, D: float, method: str) -> Tensor:
    """The Fourier multiplier [*shape] of `steps` steps of dt: exp(−D t λ_k) (exact) or (1 − D dt λ_k)^steps."""
    lam = laplacian_eigenvalues(shape)
    if method == "exact":
        return torch.exp(-D * steps * dt * lam)
    if method == "euler":
        if D * dt * 2 * len(shape) > 1 + 1e-12:
            raise EFTError(f"explicit Euler is unstable for D·dt = {D * dt} > 1/(2d) = {1 / (2 * len(shape))}")
        return (1 - D * dt * lam) ** steps
    raise EFTError(f"method must be 'exact' or 'euler', got {method!r}")


def simulate_heat_equation(shape: Sequence[int], steps: int, dt: float, D: float = 1.0, n: int = 1,
                           seed: int = 0, sigma: float = 1.0, method: str = "exact") -> Tensor:
    """Fields u(t = steps·dt) [n, *shape] (float64) of ∂u/∂t = D Δu on the periodic lattice (App. A.3, eq. 33),
    from white noise u(x, 0) ~ N(0, σ²) i.i.d. (seeded). method: 'exact' (the lattice propagator
    exp(−D t λ_k) in Fourier space) or 'euler' (explicit steps u ← u + D dt Δu, D·dt ≤ 1/(2d))."""
    shape = _check_heat(shape, steps, dt, D, sigma)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EFTError(f"n must be a positive integer, got {n!r}")
    prop = _propagator(shape, steps, dt, D, method)
    u0 = sigma * torch.randn((n, *shape), generator=torch.Generator().manual_seed(int(seed)), dtype=F64)
    dims = tuple(range(1, len(shape) + 1))
    if method == "exact":
        return torch.fft.ifftn(torch.fft.fftn(u0, dim=dims) * prop, dim=dims).real
    u = u0
    for _ in range(steps):
        lap = sum(torch.roll(u, 1, d) + torch.roll(u, -1, d) - 2 * u for d in dims)
        u = u + D * dt * lap
    return u


def lattice_heat_two_point(shape: Sequence[int], steps: int, dt: float, D: float = 1.0, sigma: float = 1.0,
                           method: str = "exact") -> Tensor:
    """G(z, t) = E[u(x, t) u(x+z, t)] [*shape] (z_μ taken mod L_μ) of `simulate_heat_equation`, in closed form:
    σ² Σ_k |prop_k|² e^{ik·z}/|Λ| — for 'exact', σ² Σ_k exp(−2Dtλ_k) e^{ik·z}/|Λ| (eq. 39–40 on the lattice)."""
    shape = _check_heat(shape, steps, dt, D, sigma)
    prop = _propagator(shape, steps, dt, D, method)
    return sigma**2 * torch.fft.ifftn(prop**2).real


def heat_equation_two_point(z: Tensor | float, t: float | Tensor, D: float = 1.0, sigma: float = 1.0) -> Tensor:
    """Continuum two-point function of ∂u/∂t = D∇²u from white noise of variance σ² (per unit cell):

        G(z, t) = σ² (8πDt)^{−d/2} exp(−|z|²/(8Dt))          z: [..., d] separations (d = last axis)

    Derived (App. A.3 with diffusion constant D): E[∂_t u(x) u(y)] = D∇²G, and the chain rule on both factors
    gives ∂G/∂t = 2D∇²G (eq. 37 with D = 1), G(z, 0) = σ²δ(z) (eq. 38), so Ĝ(k, t) = σ² e^{−2Dk²t}
    (eq. 40 ✓) and G = ∫ d^dk/(2π)^d e^{ik·z − 2Dk²t} = σ²(8πDt)^{−d/2} e^{−|z|²/8Dt}.
    Paper eq. 41 reads G(z, t) = √(π/2t) e^{−π²z²/2t}; derived (d = 1, D = σ = 1): G(z, t) = (8πt)^{−1/2}
    e^{−z²/8t}. Eq. 41 is the inverse transform of e^{−2k²t} taken with the e^{2πikz} convention while eq. 39
    uses angular k: its prefactor is 2π times and its exponent 4π² times too large. The self-similar form
    g(t) h(z²/t) (eq. 42), which the paper's argument needs, holds for both. On the unit lattice
    (`lattice_heat_two_point`) the continuum form is reached for Dt ≫ 1 (at z = 0 the relative correction is
    ≈ d/(32Dt))."""
    z = torch.as_tensor(z, dtype=F64)
    z = z.reshape(1) if z.ndim == 0 else z
    t = torch.as_tensor(t, dtype=F64)
    if not (t > 0).all() or not (D > 0 and sigma > 0):
        raise EFTError(f"t, D and sigma must be positive, got t={t.tolist()}, D={D}, sigma={sigma}")
    d = z.shape[-1]
    return sigma**2 * (8 * math.pi * D * t) ** (-d / 2) * torch.exp(-(z * z).sum(-1) / (8 * D * t))


def paper_eq41_two_point(z: Tensor | float, t: float | Tensor) -> Tensor:
    """Paper eq. 41 as printed (1-D, D = σ = 1): √(π/2t) e^{−π²z²/2t} — kept only to show the discrepancy."""
    z, t = torch.as_tensor(z, dtype=F64), torch.as_tensor(t, dtype=F64)
    return torch.sqrt(math.pi / (2 * t)) * torch.exp(-math.pi**2 * z * z / (2 * t))


def empirical_two_point(fields: Tensor) -> tuple[Tensor, Tensor]:
    """(G [*shape], standard error [*shape]) of E[u(x) u(x+z)] (eq. 34; zero-mean fields, so connected) from
    fields [n, *shape] (n ≥ 2): each sample's translation average g_i(z) = |Λ|⁻¹ Σ_x u_i(x) u_i(x+z) (FFT),
    then the mean over samples and its standard error std_i(g_i)/√n (samples are independent)."""
    if not isinstance(fields, Tensor) or fields.ndim < 2 or fields.shape[0] < 2:
        raise EFTError(f"fields must be [n ≥ 2, *shape], got {getattr(fields, 'shape', type(fields).__name__)}")
    u = fields.to(F64)
    dims = tuple(range(1, u.ndim))
    spec = torch.fft.fftn(u, dim=dims)
    g = torch.fft.ifftn(spec.abs() ** 2, dim=dims).real / math.prod(u.shape[1:])   # [n, *shape]
    return g.mean(0), g.std(0) / math.sqrt(u.shape[0])


def lattice_separations(shape: Sequence[int]) -> Tensor:
    """Separations z [*shape, d] of the lattice index of a two-point function, wrapped to (−L/2, L/2]."""
    axes = [torch.arange(n, dtype=F64) for n in shape]
    axes = [torch.where(a > n / 2, a - n, a) for a, n in zip(axes, shape, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


__all__ = ["BankSpec", "COEFFICIENT_KEYS", "EFTDenoiser", "EFTError", "OPERATORS", "apply_eft", "apply_kernel",
           "bank_moments", "bank_specs",
           "eft_coefficients", "eft_model", "empirical_two_point", "flow_coefficients", "heat_equation_two_point",
           "kernel_moments", "laplacian_eigenvalues", "lattice_derivatives", "lattice_heat_two_point",
           "lattice_separations", "linearize", "offsets", "paper_eq41_two_point", "score_coefficients",
           "simulate_heat_equation"]
