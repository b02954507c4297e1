"""Synthetic datasets with known structure: the two-image ±1 set, Gaussian random fields with a power-law
spectrum, and the patch-dictionary fields of the criticality paper (Ambrogioni, App. E.1).

Randomness is explicit: each dataset takes `seed`, and the `test` split draws from a different stream
than `train`, so the two never share a sample.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .imageset import DataError, ImageSet
from .registry import register_dataset

_SPLIT_STREAMS = {"train": 0, "test": 1}


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return value


def _generator(seed: int, split: str) -> torch.Generator:
    if split not in _SPLIT_STREAMS:
        raise DataError(f"unknown split '{split}' for a synthetic dataset; choose from {sorted(_SPLIT_STREAMS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    # one stream per (seed, split): the splits of one seed are disjoint draws
    return torch.Generator().manual_seed(seed * len(_SPLIT_STREAMS) + _SPLIT_STREAMS[split])


# ---------------------------------------------------------------- two-image


@register_dataset("two-image")
def load_two_image(split: str = "train", size: int = 8, channels: int = 1) -> ImageSet:
    """The two-image ±1 dataset x₀ = Y·1, Y ∈ {+1, −1} (Ambrogioni §6).

    Label 0 is the all −1 image, label 1 the all +1 image."""
    size, channels = _check_positive_int("size", size), _check_positive_int("channels", channels)
    images = torch.stack([-torch.ones(channels, size, size), torch.ones(channels, size, size)])  # [2, C, H, W]
    return ImageSet(images, torch.tensor([0, 1]), name="two-image", class_names=["-1", "+1"],
                    provenance={"source": "synthetic two-image ±1 set", "split": split, "size": size,
                                "channels": channels})


# ---------------------------------------------------------------- Gaussian random fields


def power_law_spectrum(size: int, exponent: float) -> torch.Tensor:
    """P(k) ∝ 1/|k|^exponent on the periodic size × size lattice (integer wavenumbers |k| = √(kx² + ky²)),
    P(0) = 0, normalized so the field it defines has unit variance per pixel: mean_k P(k) = 1.

    Returns [size, size] in torch.fft.fft2 order."""
    size = _check_positive_int("size", size)
    if size < 2:
        raise DataError("size must be at least 2 for a random field")
    freqs = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)  # integer wavenumbers
    k = torch.sqrt(freqs[:, None] ** 2 + freqs[None, :] ** 2)  # [H, W]
    spectrum = torch.zeros_like(k)
    nonzero = k > 0
    spectrum[nonzero] = k[nonzero] ** (-float(exponent))
    # Parseval: var(x) = (1/N) Σ_k P(k) for a white-noise field filtered by √P(k)
    return spectrum / spectrum.mean()


def gaussian_random_field(n: int, size: int, exponent: float, channels: int = 1,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic stationary Gaussian fields with power spectrum P(k) ∝ 1/|k|^exponent, zero mean, unit
    variance per pixel, no k = 0 mode (each field has exactly zero spatial mean).

    Made by filtering white noise in Fourier space with √P(k); the filter is real and even, so the fields
    are real. Returns (fields [n, channels, size, size] float32, unclipped; spectrum [size, size] float64,
    the theoretical P(k) in fft2 order, E|fft2(x)|² = size² · P(k))."""
    n, channels = _check_positive_int("n", n), _check_positive_int("channels", channels)
    spectrum = power_law_spectrum(size, exponent)  # [H, W]
    noise = torch.randn(n, channels, size, size, generator=generator, dtype=torch.float64)  # [n, C, H, W]
    fields = torch.fft.ifft2(torch.fft.fft2(noise) * spectrum.sqrt()).real
    return fields.to(torch.float32), spectrum


@register_dataset("grf")
def load_grf(split: str = "train", n: int = 1000, size: int = 32, exponent: float = 2.0, channels: int = 1,
             clip_sigmas: float = 3.0, seed: int = 0) -> ImageSet:
    """Periodic Gaussian random fields with power spectrum P(k) ∝ 1/k^exponent.

    See `gaussian_random_field`; the fields are mapped into [-1, 1] by a fixed linear scale and a clip:
    x = clip(φ / clip_sigmas, −1, 1) with φ of unit variance, so about 0.27% of pixels are clipped at the
    default clip_sigmas = 3 and the spectrum is otherwise unchanged (provenance records the fraction)."""
    if isinstance(clip_sigmas, bool) or not isinstance(clip_sigmas, (int, float)) or clip_sigmas <= 0:
        raise DataError(f"clip_sigmas must be a positive number, got {clip_sigmas!r}")
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or not math.isfinite(exponent):
        raise DataError(f"exponent must be a finite number, got {exponent!r}")
    fields, _ = gaussian_random_field(n, size, exponent, channels, generator=_generator(seed, split))
    scaled = fields / clip_sigmas
    clipped_fraction = float((scaled.abs() > 1).float().mean())
    return ImageSet(scaled.clamp(-1, 1), name="grf",
                    provenance={"source": "synthetic Gaussian random field, P(k) ∝ 1/k^a, periodic",
                                "split": split, "n": n, "size": size, "exponent": float(exponent),
                                "channels": channels, "seed": seed,
                                "normalization": f"unit variance, then x = clip(x / {clip_sigmas:g}, -1, 1)",
                                "clipped_fraction": clipped_fraction})


# ---------------------------------------------------------------- patch dictionary


class PatchDictionary(NamedTuple):
    """A dictionary of P × P ±1 patterns with prior probabilities (unpacks as `patterns, priors`)."""

    patterns: torch.Tensor  # [K, P, P], entries ±1
    priors: torch.Tensor  # [K], sums to 1


def make_patch_dictionary(patch_size: int = 5, n_random: int = 8, global_mass: float = 0.9,
                          seed: int = 0) -> PatchDictionary:
    """The patch dictionary of Ambrogioni (App. E.1, Eq. 49): n_random random ±1 patterns made of
    n_random/2 draws and their sign flips −p_k (global Z₂ symmetry), then the all +1 and all −1 patterns.
    The random patterns share prior mass 1 − global_mass equally; the two uniform ones share global_mass.

    The defaults are the paper's: 5 × 5 patches, K = 10 patterns (Eq. 49 lists k = 1..8 random patterns
    at 0.1/8 each and k = 9, 10 uniform at 0.9/2 each; "eight random patterns with their sign-flipped
    copies" is read as four draws plus their four flips, which is what makes the stated total of ten).
    Order: [p_1, …, p_{n/2}, −p_1, …, −p_{n/2}, +1, −1]."""
    patch_size = _check_positive_int("patch_size", patch_size)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0 or n_random % 2:
        raise DataError(f"n_random must be an even number ≥ 0 (draws plus their sign flips), got {n_random!r}")
    if not isinstance(global_mass, (int, float)) or not 0.0 <= global_mass <= 1.0:
        raise DataError(f"global_mass must lie in [0, 1], got {global_mass!r}")
    if n_random == 0 and global_mass != 1.0:
        raise DataError("with n_random = 0 the uniform patterns carry all the mass: use global_mass=1")
    g = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, 2, (n_random // 2, patch_size, patch_size), generator=g).float() * 2 - 1
    ones = torch.ones(1, patch_size, patch_size)
    patterns = torch.cat([draws, -draws, ones, -ones])  # [K, P, P]
    random_prior = torch.full((n_random,), (1.0 - global_mass) / n_random if n_random else 0.0)
    priors = torch.cat([random_prior, torch.full((2,), global_mass / 2)]).to(torch.float64)
    return PatchDictionary(patterns, priors / priors.sum())


def tile_patch_fields(dictionary: PatchDictionary, n: int, size: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fields on a periodic size × size lattice made of (size/P)² blocks, each block an independent draw
    k ~ π from the dictionary, then the whole field rolled by a uniform random offset (periodic), so no
    pixel position is special. Returns (fields [n, 1, size, size] ±1, pattern indices [n, size/P, size/P])."""
    patterns, priors = dictionary
    p = patterns.shape[-1]
    n = _check_positive_int("n", n)
    size = _check_positive_int("size", size)
    if size % p:
        raise DataError(f"size {size} must be a multiple of the patch size {p} to tile a periodic lattice")
    blocks = size // p
    index = torch.multinomial(priors.float(), n * blocks * blocks, replacement=True, generator=generator)
    index = index.reshape(n, blocks, blocks)  # [n, b, b]
    tiles = patterns[index]  # [n, b, b, P, P]
    fields = tiles.permute(0, 1, 3, 2, 4).reshape(n, 1, size, size)  # [n, 1, size, size]
    # periodic roll of field i by shifts[i]: out[y, x] = field[(y − dy) mod size, (x − dx) mod size]
    shifts = torch.randint(0, p, (n, 2), generator=generator)  # [n, 2]
    coords = torch.arange(size)
    rows = (coords[None, :] - shifts[:, :1]) % size  # [n, size]
    cols = (coords[None, :] - shifts[:, 1:]) % size  # [n, size]
    fields = fields[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]
    return fields, index


@register_dataset("patch-dictionary")
def load_patch_dictionary(split: str = "train", n: int = 100, size: int = 80, patch_size: int = 5,
                          n_random: int = 8, global_mass: float = 0.9, dictionary_seed: int = 0,
                          seed: int = 0) -> ImageSet:
    """±1 fields tiled from the patch dictionary of Ambrogioni App. E.1 on a periodic lattice.

    The dictionary is `make_patch_dictionary`'s, the fields i.i.d. block tilings (`tile_patch_fields`).
    The paper defines the dictionary, its priors and the patch score (Eq. 54–57) but no training fields;
    tiling with the prior is the simplest field whose every aligned patch is a dictionary pattern drawn
    with probability π_k.
    The dictionary and priors are stored in provenance for the `dictionary` machine."""
    dictionary = make_patch_dictionary(patch_size, n_random, global_mass, seed=dictionary_seed)
    fields, _ = tile_patch_fields(dictionary, n, size, generator=_generator(seed, split))
    return ImageSet(fields, name="patch-dictionary",
                    provenance={"source": "synthetic patch-dictionary fields (Ambrogioni App. E.1, Eq. 49)",
                                "split": split, "n": n, "size": size, "patch_size": patch_size,
                                "n_random": n_random, "global_mass": global_mass,
                                "dictionary_seed": dictionary_seed, "seed": seed,
                                "generation": "i.i.d. P×P blocks drawn from the prior, random periodic roll",
                                "dictionary": dictionary.patterns.tolist(),
                                "priors": dictionary.priors.tolist()})
