"""Orthonormal bases U of the component-wise forward processes (rg-diffusion-slides.txt, "Component spaces").

A basis is a real orthonormal D × D matrix Q (rows are the basis vectors, D = C·H·W) acting on flattened images:
analysis c = Q x (the components, `forward`), synthesis x = Qᵀ c (`inverse`), so U = Qᵀ in the slides'
dφ = −½ U β U† φ dt + U √β S U† dw. Every basis also gives one "|k|" per component (`k_abs`, [D]): the scale
the RG cutoff K_Λ(k) = σ(Λ − |k|) acts on, in integer wavenumbers of the periodic lattice (the units of
`scorefield.data.synthetic.power_law_spectrum`), and one shell index per component (`shells`, [D] int64, 0 = the
lowest |k|): the groups the scale-by-scale schedule noises one after another — integer |k| shells (|k| rounded, the
shells of the radially averaged power spectrum) for every basis but Haar, whose shells are its levels.

- pixel: Q = I (standard diffusion acts per pixel; its |k| is 0 everywhere).
- fourier: the real 2-D Fourier basis of the periodic H × W lattice, per channel: for each pair {k, −k} a cosine
  and a sine √(2/HW)·cos / sin(2π(k_y y/H + k_x x/W)), one cosine 1/√(HW)·cos for the self-conjugate k (k = 0 and
  the Nyquist modes). |k| = √(k_y² + k_x²) with signed integer wavenumbers; components sorted by |k|.
- dct: the orthonormal 2-D DCT-II per channel (Neumann boundaries: the eigenbasis of the heat equation used by
  inverse heat dissipation and blurring diffusion). Index (p, q) has frequency² (πp/H)² + (πq/W)²
  (`dct_frequencies_squared`, as in Rissanen et al.'s DCTBlur) and |k| = √((p/2)² + (q/2)²) (cos(πpn/N) has
  period 2N/p).
- haar: the orthonormal multi-level 2-D Haar wavelet transform per channel (Mallat's pyramid: each level splits the
  current approximation into LL, LH, HL, HH); detail coefficients of level j (1 = finest) get |k| = N/2^(j+½), the
  final approximation N/2^(J+1½), N = min(H, W). Levels default to as many as halve both sides exactly.
- pca: the eigenvectors of the training set's covariance (all C·H·W pixels together), largest variance first.
  "Could reinterpret as momenta": component i gets the i-th smallest Fourier |k| of the lattice, so a
  stationary dataset with a falling spectrum gets the same |k| in both bases. `whiten=True` keeps the same
  orthonormal basis and records the eigenvalues as `metric`: the process's noise is then white in the whitened
  coordinates c/√λ, i.e. its colour is multiplied by λ (see `forward.process`).

All matrices are built once in float64 (dense: fine up to ≈ 64 × 64 × 3 components) and orthonormality is exact
to float64 rounding (tests/test_forward.py checks Q Qᵀ = I and the round trip).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..options import closest

Tensor = torch.Tensor

BASES = ("pixel", "fourier", "dct", "haar", "pca")
MAX_COMPONENTS = 16384      # dense D × D float64 matrices: 2 GiB at this size


class BasisError(ValueError):
    """An unknown basis, or one that does not fit the images."""


class Basis:
    """An orthonormal basis Q [D, D] (rows are basis vectors) of flattened [C, H, W] images, with |k| [D]."""

    def __init__(self, name: str, matrix: Tensor, k_abs: Tensor, image_shape: tuple[int, int, int],
                 options: dict[str, Any] | None = None, metric: Tensor | None = None,
                 shells: Tensor | None = None) -> None:
        D = math.prod(image_shape)
        if matrix.shape != (D, D) or k_abs.shape != (D,):
            raise BasisError(f"basis '{name}' must be [{D}, {D}] with |k| [{D}], got {tuple(matrix.shape)} and "
                             f"{tuple(k_abs.shape)}")
        self.name = name
        self.image_shape = tuple(int(s) for s in image_shape)
        self.matrix = matrix.to(torch.float64).contiguous()           # Q: [D, D], rows are basis vectors
        self.k_abs = k_abs.to(torch.float64)                          # [D]
        self.options = dict(options or {})
        # noise metric: the process colour is multiplied by it (whitened PCA: the eigenvalues); ones otherwise
        self.metric = torch.ones(D, dtype=torch.float64) if metric is None else metric.to(torch.float64)
        self.identity = name == "pixel"
        self.shells = (torch.unique(self.k_abs.round(), return_inverse=True)[1] if shells is None
                       else torch.as_tensor(shells).to(torch.int64).reshape(D))   # [D], 0 = lowest |k|
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def _q(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self.matrix.to(dtype=like.dtype, device=like.device)
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        """Components c = Q x: x [B, C, H, W] (or [B, D]) -> [B, D]."""
        flat = x.reshape(x.shape[0], -1)
        return flat if self.identity else flat @ self._q(flat).T

    def inverse(self, c: Tensor) -> Tensor:
        """Images x = Qᵀ c: c [B, D] -> [B, C, H, W]."""
        flat = c if self.identity else c @ self._q(c)
        return flat.reshape(c.shape[0], *self.image_shape)

    def spec(self) -> dict[str, Any]:
        return {"basis": self.name, **self.options}

    def __repr__(self) -> str:
        return f"Basis({self.name}, image_shape={self.image_shape}, options={self.options})"


# ---- 1-D and per-plane building blocks ---------------------------------------------------------------------

def signed_wavenumbers(n: int) -> Tensor:
    """Integer wavenumbers 0, 1, …, ⌊n/2⌋, −⌈n/2⌉+1, …, −1 (fft order) as float64."""
    return torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)


def fourier_plane(H: int, W: int) -> tuple[Tensor, Tensor]:
    """Real orthonormal Fourier basis of the periodic H × W lattice: (Q [HW, HW], |k| [HW]), sorted by |k|."""
    y = torch.arange(H, dtype=torch.float64)[:, None]
    x = torch.arange(W, dtype=torch.float64)[None, :]
    ky, kx = signed_wavenumbers(H), signed_wavenumbers(W)
    rows, ks, seen = [], [], set()
    for a in range(H):
        for b in range(W):
            partner = ((-a) % H, (-b) % W)
            if (a, b) in seen:
                continue
            seen.update({(a, b), partner})
            phase = 2 * math.pi * (a * y / H + b * x / W)                  # [H, W]
            k = math.hypot(float(ky[a]), float(kx[b]))
            if partner == (a, b):                                          # k = 0 and the Nyquist modes
                rows.append(torch.cos(phase).reshape(-1) / math.sqrt(H * W))
                ks.append(k)
            else:
                rows.append(torch.cos(phase).reshape(-1) * math.sqrt(2.0 / (H * W)))
                rows.append(torch.sin(phase).reshape(-1) * math.sqrt(2.0 / (H * W)))
                ks += [k, k]
    Q, k_abs = torch.stack(rows), torch.tensor(ks, dtype=torch.float64)
    order = torch.argsort(k_abs, stable=True)
    return Q[order], k_abs[order]


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II [n, n]: C[p, m] = √((1 or 2)/n)·cos(π(2m+1)p/(2n)) (scipy's dct(norm='ortho'))."""
    p = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    C = torch.cos(math.pi * (2 * m + 1) * p / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C


def dct_plane(H: int, W: int) -> tuple[Tensor, Tensor]:
    """2-D DCT-II basis (Q [HW, HW], row (p, q) = outer(C_H[p], C_W[q]) in row-major (p, q) order), |k| [HW]."""
    Q = torch.kron(dct_matrix(H), dct_matrix(W))
    p = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)
    q = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    return Q, (0.5 * torch.sqrt(p**2 + q**2)).reshape(-1)


def dct_frequencies_squared(H: int, W: int) -> Tensor:
    """(πp/H)² + (πq/W)² per DCT component [HW] (row-major (p, q)): the heat equation's decay rates of
    Rissanen et al. (DCTBlur: freqs = π·linspace(0, N−1, N)/N) and Hoogeboom & Salimans."""
    fy = math.pi * torch.arange(H, dtype=torch.float64) / H
    fx = math.pi * torch.arange(W, dtype=torch.float64) / W
    return (fy[:, None] ** 2 + fx[None, :] ** 2).reshape(-1)


def haar_levels(H: int, W: int) -> int:
    """How many times both sides halve exactly."""
    levels = 0
    while H % 2 == 0 and W % 2 == 0 and H >= 2 and W >= 2:
        H, W, levels = H // 2, W // 2, levels + 1
    return levels


def haar_analysis(x: Tensor, levels: int) -> Tensor:
    """Multi-level orthonormal 2-D Haar transform of x [..., H, W] (Mallat layout: the approximation of the last
    level in the top-left block, details of level j in the three blocks beside it)."""
    out = x.clone()
    h, w = x.shape[-2:]
    for _ in range(levels):
        block = out[..., :h, :w]
        a = (block[..., 0::2, :] + block[..., 1::2, :]) / math.sqrt(2)       # rows: low
        d = (block[..., 0::2, :] - block[..., 1::2, :]) / math.sqrt(2)       # rows: high
        rows = torch.cat([a, d], dim=-2)                                     # [..., h, w]
        lo = (rows[..., :, 0::2] + rows[..., :, 1::2]) / math.sqrt(2)
        hi = (rows[..., :, 0::2] - rows[..., :, 1::2]) / math.sqrt(2)
        out[..., :h, :w] = torch.cat([lo, hi], dim=-1)
        h, w = h // 2, w // 2
    return out


def haar_plane(H: int, W: int, levels: int | None = None) -> tuple[Tensor, Tensor, int]:
    """(Q [HW, HW], |k| [HW], levels) of the multi-level 2-D Haar transform: row i of Q is the analysis of the
    i-th coefficient, i.e. Q x = haar_analysis(x).reshape(-1)."""
    most = haar_levels(H, W)
    levels = most if levels is None else int(levels)
    if levels < 1 or levels > most:
        raise BasisError(f"a Haar basis of {H}×{W} images allows 1…{most} levels (both sides must halve exactly), "
                         f"got {levels}" if most else f"a Haar basis needs even image sides, got {H}×{W}")
    eye = torch.eye(H * W, dtype=torch.float64).reshape(H * W, H, W)
    Q = haar_analysis(eye, levels).reshape(H * W, H * W).T          # column j = transform of pixel j → Q x
    N = min(H, W)
    level = torch.full((H, W), float(levels + 1), dtype=torch.float64)                  # the approximation block
    h, w = H, W
    for j in range(1, levels + 1):
        mask = torch.zeros(H, W, dtype=torch.bool)
        mask[:h, :w] = True
        mask[: h // 2, : w // 2] = False
        level[mask] = float(j)
        h, w = h // 2, w // 2
    k = N / 2.0 ** (level + 0.5)
    return Q.contiguous(), k.reshape(-1).to(torch.float64), levels


# ---- making bases ------------------------------------------------------------------------------------------

def _per_channel(Q: Tensor, k: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    if channels == 1:
        return Q, k
    return torch.block_diag(*([Q] * channels)), k.repeat(channels)


def _image_shape(data: Any, image_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if image_shape is not None:
        return tuple(int(s) for s in image_shape)  # type: ignore[return-value]
    if data is None:
        raise BasisError("give the data (or image_shape) the basis is for")
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    if images.ndim != 4:
        raise BasisError(f"data must be [N, C, H, W] images, got shape {tuple(images.shape)}")
    return tuple(int(s) for s in images.shape[1:])  # type: ignore[return-value]


def _images(data: Any) -> Tensor:
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    return images.reshape(images.shape[0], -1).to(torch.float64)


def make_basis(name: str, data: Any = None, image_shape: tuple[int, int, int] | None = None,
               levels: int | None = None, whiten: bool = False, eigenvalue_floor: float = 1e-6) -> Basis:
    """The basis `name` ('pixel' | 'fourier' | 'dct' | 'haar' | 'pca') for the images of `data` (an ImageSet or
    [N, C, H, W] tensor; PCA needs it) or of `image_shape` (C, H, W). `levels`: Haar levels (default the most);
    `whiten`: PCA whitening (noise white in c/√λ); eigenvalue_floor: PCA eigenvalues below floor·mean are raised
    to it (constant pixels, e.g. MNIST's border, have zero variance)."""
    if name not in BASES:
        raise BasisError(f"unknown basis '{name}'{closest(str(name), BASES)}; available: {', '.join(BASES)}")
    C, H, W = _image_shape(data, image_shape)
    D = C * H * W
    if D > MAX_COMPONENTS:
        raise BasisError(f"{C}×{H}×{W} images have {D} components; dense bases are limited to {MAX_COMPONENTS}")
    if whiten and name != "pca":
        raise BasisError(f"whiten applies to the PCA basis, not '{name}'")
    if levels is not None and name != "haar":
        raise BasisError(f"levels applies to the Haar basis, not '{name}'")
    if name == "pixel":
        return Basis("pixel", torch.eye(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), (C, H, W))
    if name == "fourier":
        return Basis("fourier", *_per_channel(*fourier_plane(H, W), C), (C, H, W))
    if name == "dct":
        return Basis("dct", *_per_channel(*dct_plane(H, W), C), (C, H, W))
    if name == "haar":
        Q, k, used = haar_plane(H, W, levels)
        Q, k = _per_channel(Q, k, C)
        shells = torch.unique(k, return_inverse=True)[1]                 # the levels, 0 = the approximation
        return Basis("haar", Q, k, (C, H, W), options={"levels": used}, shells=shells)
    # pca
    if data is None:
        raise BasisError("the PCA basis needs the training data")
    x = _images(data)                                                            # [N, D]
    if x.shape[1] != D:
        raise BasisError(f"data of {x.shape[1]} pixels for images {(C, H, W)}")
    if x.shape[0] < 2:
        raise BasisError("the PCA basis needs at least 2 training images")
    cov = torch.cov(x.T, correction=1).reshape(D, D)
    lam, V = torch.linalg.eigh(0.5 * (cov + cov.T))
    order = torch.argsort(lam, descending=True)
    lam, V = lam[order], V[:, order]
    lam = lam.clamp_min(float(eigenvalue_floor) * float(lam.clamp_min(0).mean()) + 1e-300)
    _, k_fourier = fourier_plane(H, W)
    k = torch.sort(k_fourier.repeat(C)).values                                   # i-th largest variance ↔ i-th |k|
    return Basis("pca", V.T.contiguous(), k, (C, H, W), options={"whiten": bool(whiten)},
                 metric=lam if whiten else None)
