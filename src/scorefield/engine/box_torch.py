"""The box-sum route of the circular ELS posterior as batched torch tensor ops: the computation of the compiled
CPU kernel of `box` (`box_posterior`, without its skipping of negligible keys), on any device (CPU, CUDA), in
float32 or float64, and differentiable in x through autograd.

For a noisy sample x [B, C, H, W] at ᾱ (a = √ᾱ, s² = 1−ᾱ) and training images K [N, C, H, W] with log-weights
logw [N], the posterior mean at a query pixel u over all H·W circular P×P patches of every image is
(kamb-ganguli eq. 9–10, circular)

    x̂₀(u) = Σ_{n, v} softmax_{n,v}(ℓ_{n,v}(u)) · K_n(v),   ℓ_{n,v}(u) = −‖patch_u(x) − a·patch_v(K_n)‖²/(2s²) + logw_n.

With v = u − δ the squared distance is the P×P circular box sum at u of the image
p_δ(·) = Σ_c (x_c(·) − a·K_{n,c}(· − δ))², and the value of key (n, v) is the training pixel K_n(u − δ), all C
channels. Every term is a non-negative square, so no expansion cancels at low noise.

Layout: a chunk of n training images takes all H·W displacements δ at once, as [B, H(y), W(x), n, H·W(δ)] with
the query pixel u = (y, x) outermost. The shifted keys K_n(u − δ) [C, H, W, n, H·W] are one gather per chunk and
are also the values. The circular P×P box sums over u are running window sums along y, then along x
(out[i] = out[i−1] + t[i+r] − t[i−r−1]): each step adds and subtracts whole slabs [B, W, n, H·W] (along y) or
[B, H, n, H·W] (along x), so the work per (query pixel, key) pair is four adds whatever P. Reductions over keys
(min, max, sums) run over the contiguous trailing (n, δ); the weighted values are one small GEMM per query
pixel. Each query pixel's chunk state (m, l, acc) is an exact streaming log-sum-exp; chunk states combine by
`softmax.merge`. On the CPU this beat, per box sum: 2D cumulative sums (one subtraction of large prefix sums
per window, the float32 error growing with the whole image), separable cumulative sums, separable or P×P
`avg_pool2d`, separable `conv2d`, doubling window sums on a circularly padded copy, and (nearly as fast) two
GEMMs with 0/1 circulant band matrices.

Precision: a float32 distance of magnitude D carries an error ~D·2⁻²⁴, i.e. a logit error ~D/(2s²)·2⁻²⁴ —
~1e-3 for a query far from every key at low noise (D/(2s²) ≈ 5000), and running sums would add more. So, as in
the compiled kernel, the squares are split into a fixed-point part on a per-sample power-of-two grid (every
window sum below 2²³ grid units: the running sums of these integers are exact) and a remainder below half a
grid step (summed in floating point, its error negligible); the distances are carried relative to each query
pixel's smallest one in the chunk (an exact integer subtraction), the logits are formed from that small excess,
and the base and the running state are float64. float64 does the same on a 2⁵² grid. What remains is the
rounding of the squares themselves: max abs error vs the float64 oracle ~1e-6 (≤ 1e-5 for standard-normal
queries far from every key) at ᾱ ≤ 0.95 in float32, ~1e-13 in float64.

Cost: O(B·N·(H·W)²·C) flops — the squares, four adds per pair for each of the two box sums (fixed-point part
and remainder), the exponentials and the weighted values — independent of P, against O(B·N·(H·W)²·P²·C) for
patch dot products. It is the GPU form of the box route: every step is a batched gather, elementwise op, slab
add, reduction or GEMM over [B, H, W, n, H·W] tensors, with no per-pixel loop and no host synchronisation
inside the fold (the input checks synchronise once), so the same code runs on whatever device the inputs live
on; TF32/bfloat16 GEMMs are switched off for the call.

Memory: the images per chunk are chosen from `memory_budget` (`chunk_bytes`); on the CPU they are capped further
so that one chunk tensor stays near the L3 cache (CPU_CHUNK_BYTES). A no-grad call reuses three (four for C > 1)
chunk-sized buffers for every chunk (`Workspace`); a differentiable call allocates every step and keeps the
tensors of every chunk for the backward pass, so there the whole fold must fit the budget.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import PatchConfigError, PatchMemoryError
from .posterior import DEFAULT_MEMORY_BUDGET, noise_coefficients
from .softmax import LOGIT_FLOOR, SoftmaxState, finalize, merge

Tensor = torch.Tensor

LOG2E = 1.4426950408889634   # log₂e: the weights are exp2(ℓ·log₂e)
WORK_COPIES = 3          # [B, H, W, n, H·W] buffers of a no-grad fold: the squares (then the remainder, its box
                         # sums, the excess, the weights), the fixed-point part (then its box sums), the running
                         # sums along y; a fourth (a channel's difference) when C > 1
SAVED_COPIES = 22        # ... kept per chunk for the backward pass of a differentiable call, besides two per channel
CPU_CHUNK_BYTES = 2**25  # on the CPU, one chunk buffer [B, H, W, n, H·W] is kept near the L3 cache (at least one
                         # image per chunk): as fast as or faster than larger chunks at B=8, 28×28


# ---- validation ------------------------------------------------------------------------------------------------

def check_inputs(x: Tensor, alpha_bar: Tensor | float, images: Tensor, patch_size: int,
                 log_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ᾱ [B] float64, logw [N] float64), both on x's device, after checking shapes, patch size and finiteness."""
    if not isinstance(x, Tensor) or not isinstance(images, Tensor) or x.ndim != 4 or images.ndim != 4:
        raise PatchConfigError(f"x and images must be [B, C, H, W] and [N, C, H, W] tensors, got "
                               f"{_shape(x)} and {_shape(images)}")
    if tuple(x.shape[1:]) != tuple(images.shape[1:]):
        raise PatchConfigError(f"x {tuple(x.shape)} and images {tuple(images.shape)} differ in channels or size")
    b, _, h, w = x.shape
    n = images.shape[0]
    if b == 0 or n == 0:
        raise PatchConfigError(f"need at least one sample and one training image, got B={b}, N={n}")
    if (isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0
            or patch_size > min(h, w)):
        raise PatchConfigError(f"patch_size must be an odd integer in [1, min(H, W)] = [1, {min(h, w)}], "
                               f"got {patch_size!r}")
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1)
    ab = ab.expand(b) if ab.numel() == 1 else ab
    if ab.shape != (b,):
        raise PatchConfigError(f"alpha_bar must be a scalar or have shape [B]=[{b}], got {tuple(ab.shape)}")
    logw = torch.zeros(n, dtype=torch.float64, device=x.device) if log_weights is None else \
        torch.as_tensor(log_weights, dtype=torch.float64, device=x.device).reshape(-1)
    if logw.shape != (n,):
        raise PatchConfigError(f"log_weights must have shape [N]=[{n}], got {tuple(logw.shape)}")
    for name, t in (("x", x), ("images", images), ("alpha_bar", ab), ("log_weights", logw)):
        if not bool(torch.isfinite(t.detach()).all()):
            raise PatchConfigError(f"{name} contains NaN or infinite values")
    if bool(((ab < 0) | (ab > 1)).any()):
        raise PatchConfigError(f"alpha_bar must lie in [0, 1], got range [{float(ab.min())}, {float(ab.max())}]")
    return ab, logw


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


# ---- memory ----------------------------------------------------------------------------------------------------

def chunk_bytes(batch: int, images: int, channels: int, height: int, width: int, itemsize: int,
                differentiable: bool = False) -> int:
    """Peak bytes of folding `images` training images at once: the shifted keys [C, H, W, n, H·W] (twice: gathered,
    then laid out) and WORK_COPIES [B, H, W, n, H·W] buffers, one more (a channel's difference) when C > 1; when
    differentiable, SAVED_COPIES + 2·C of them (autograd keeps the intermediates). Checked against the peak
    resident memory of CPU runs (no-grad within 5%, differentiable a slight overestimate)."""
    pairs = batch * images * (height * width) ** 2
    keys = 2 * images * channels * (height * width) ** 2
    copies = SAVED_COPIES + 2 * channels if differentiable else WORK_COPIES + (channels > 1)
    return (keys + pairs * copies) * itemsize


def plan_chunk(batch: int, images_shape: tuple[int, ...], itemsize: int, memory_budget: float,
               differentiable: bool, chunk_images: int | None, device: torch.device) -> int:
    """Training images per chunk: `chunk_images`, or the most whose `chunk_bytes` fit `memory_budget`
    (a differentiable call keeps every chunk, so there all N must fit), on the CPU at most CPU_CHUNK_BYTES per
    [B, H, W, n, H·W] buffer. Raises PatchMemoryError when even one image per chunk does not fit."""
    n, c, h, w = images_shape
    if chunk_images is not None:
        if isinstance(chunk_images, bool) or int(chunk_images) != chunk_images or chunk_images < 1:
            raise PatchConfigError(f"chunk_images must be a positive integer, got {chunk_images!r}")
        return min(int(chunk_images), n)
    one = chunk_bytes(batch, 1, c, h, w, itemsize, differentiable)
    need = one * n if differentiable else one
    if need > memory_budget:
        what = f"all {n} training images (a differentiable call keeps every chunk)" if differentiable \
            else "one training image per chunk"
        raise PatchMemoryError(f"the torch box-sum posterior needs about {need / 2**20:.1f} MiB for {what} "
                               f"with B={batch} and images {tuple(images_shape[1:])}, over the memory budget of "
                               f"{memory_budget / 2**20:.1f} MiB; denoise fewer samples at once or raise "
                               "memory_budget")
    fits = n if differentiable else int(memory_budget // one)
    if device.type == "cpu":
        fits = min(fits, CPU_CHUNK_BYTES // (batch * (h * w) ** 2 * itemsize))
    return max(1, min(n, fits))


# ---- geometry --------------------------------------------------------------------------------------------------

def shift_index(height: int, width: int, device: torch.device) -> Tensor:
    """[H, W, H·W] flat pixel indices of u − δ (wrapped) for query pixel u = (y, x) and displacement δ = (dy, dx):
    entry [y, x, δ] indexes K(u − δ), the centre of key patch v = u − δ."""
    y = torch.arange(height, device=device)
    x = torch.arange(width, device=device)
    key_y = (y[:, None] - y[None, :]).remainder(height)                    # [H(y), H(dy)]
    key_x = (x[:, None] - x[None, :]).remainder(width)                     # [W(x), W(dx)]
    index = key_y[:, None, :, None] * width + key_x[None, :, None, :]      # [H, W, H(dy), W(dx)]
    return index.reshape(height, width, height * width)


class Workspace:
    """Flat buffers that every chunk of a no-grad fold reuses (a fresh CPU allocation page-faults on first touch,
    which costs about as much as the arithmetic on it). `take` views the first elements of one as a shape; a
    Workspace of None (a differentiable call) makes every step allocate, as autograd needs."""

    def __init__(self, names: tuple[str, ...], numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffers = {name: torch.empty(numel, dtype=dtype, device=device) for name in names}

    def take(self, name: str, shape: tuple[int, ...]) -> Tensor:
        return self.buffers[name][:math.prod(shape)].view(shape)


def _take(ws: Workspace | None, name: str, shape: tuple[int, ...]) -> Tensor | None:
    return None if ws is None else ws.take(name, shape)


def window_sums(t: Tensor, patch_size: int, dim: int, out: Tensor | None = None) -> Tensor:
    """Circular sums of P consecutive entries along `dim` (an outer dim of t), centred: out[i] = Σ_{|j|≤P//2}
    t[(i + j) mod size], as a running sum out[i] = out[i−1] + t[i+r] − t[i−r−1] over slabs of t: exact for
    integers whose window sums stay below the mantissa range, a few ulp of the window's magnitude otherwise.
    Written into `out` (not aliasing t), or stacked from new slabs when out is None (differentiable)."""
    size, r = t.shape[dim], patch_size // 2
    row = t.select(dim, -r % size).clone() if out is None else out.select(dim, 0).copy_(t.select(dim, -r % size))
    for j in range(-r + 1, r + 1):
        row = row + t.select(dim, j % size) if out is None else row.add_(t.select(dim, j % size))
    rows = [row]
    for i in range(1, size):
        add, drop = t.select(dim, (i + r) % size), t.select(dim, (i - r - 1) % size)
        if out is None:
            rows.append(rows[-1] + add - drop)
        else:
            torch.add(out.select(dim, i - 1), add, out=out.select(dim, i)).sub_(drop)
    return torch.stack(rows, dim) if out is None else out


def box_sums(t: Tensor, patch_size: int, scratch: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """P×P circular window sums over the query pixel u = (y, x) of t [B, H, W, n, K]: running window sums along y
    (into scratch), then along x (into out, which may be t itself), each step an add and a subtract of [B, W, n, K]
    or [B, H, n, K] slabs. Buffers None: new tensors (differentiable)."""
    if patch_size == 1:
        return t
    return window_sums(window_sums(t, patch_size, 1, scratch), patch_size, 2, out)


# ---- the fold --------------------------------------------------------------------------------------------------

def fixed_point_scales(x: Tensor, a: Tensor, images: Tensor, patch_size: int, dtype: torch.dtype) -> Tensor:
    """[B] float64 powers of two: per sample, the grid 1/scale of the fixed-point squares, so that no window sum of
    (x − a·K)² exceeds 1/eps grid units (2^23 in float32, 2^52 in float64: integers are exact to twice that, which
    leaves headroom for the rounding of the squares and the running sums); the bound used for the window sum is
    max_u Σ_window Σ_c (|x_c| + a·max|K|)²."""
    k_max = images.detach().abs().amax().to(torch.float64)
    bound = ((x.detach().to(torch.float64).abs() + a[:, None, None, None] * k_max) ** 2).sum(1)    # [B, H, W]
    window = box_sums(bound[..., None, None], patch_size).amax(dim=(1, 2, 3, 4))                  # [B]
    grid_range = 1 / torch.finfo(dtype).eps
    return torch.exp2(torch.floor(torch.log2(grid_range / window.clamp_min(2.0**-100))))


def squared_differences(queries: Tensor, a: Tensor, keys: Tensor, ws: Workspace | None) -> Tensor:
    """p_δ(u) = Σ_c (x_c(u) − a·K_{n,c}(u − δ))²: [B, H, W, n, H·W] from queries [B, C, H, W], a [B] and shifted
    keys [C, H, W, n, H·W]."""
    shape = (queries.shape[0], *keys.shape[1:])
    total = None
    for c in range(queries.shape[1]):
        diff = torch.addcmul(queries[:, c, :, :, None, None], a[:, None, None, None, None], keys[None, c], value=-1,
                             out=_take(ws, "squares" if total is None else "diff", shape))
        if total is None:
            total = diff.square_() if ws is not None else diff.square()
        else:
            total = total.addcmul_(diff, diff) if ws is not None else total + diff.square()
    return total


def split_distances(squares: Tensor, patch_size: int, scale: Tensor, ws: Workspace | None) -> tuple[Tensor, Tensor]:
    """(base [B, H, W] float64, excess [B, H, W, n, H·W]) with base + excess = ‖patch_u(x) − a·patch_v(K_n)‖², base
    each query pixel's smallest distance in the chunk (up to the remainder). squares = grid/scale + rest with grid
    integer and |rest| ≤ 1/(2·scale): grid's box sums are exact integers, so excess = (box(grid) − min box(grid))
    /scale + box(rest) is a small number with a small rounding error. Gradients flow through `rest`."""
    s = scale.to(squares.dtype)[:, None, None, None, None]
    shape = tuple(squares.shape)
    grid = torch.mul(squares.detach(), s, out=_take(ws, "grid", shape)).round_()    # integers, windows < 1/eps
    rest = squares.addcmul_(grid, 1 / s, value=-1) if ws is not None else squares - grid / s
    scratch = _take(ws, "scratch", shape)
    grid_sum = box_sums(grid, patch_size, scratch, grid if ws is not None else None)   # exact
    base = grid_sum.flatten(3).amin(dim=-1)                                # [B, H, W]
    excess = grid_sum.sub_(base[..., None, None])                          # exact integers ≥ 0
    rest_sum = box_sums(rest, patch_size, scratch, rest if ws is not None else None)
    excess = rest_sum.addcmul_(excess, 1 / s) if ws is not None else torch.addcmul(rest_sum, excess, 1 / s)
    return base.to(torch.float64) / scale[:, None, None], excess


def weighted_values(weights: Tensor, keys: Tensor) -> Tensor:
    """acc [B, H·W, C] = Σ_{n,δ} weights[b, u, n, δ]·K_n(u − δ): one GEMM per query pixel u, [B, n·K] @ [n·K, C],
    from weights [B, H, W, n, K] and keys [C, H, W, n, K]."""
    b, h, w, n, k = weights.shape
    lhs = weights.reshape(b, h * w, n * k).transpose(0, 1)                 # [H·W, B, n·K]
    rhs = keys.reshape(keys.shape[0], h * w, n * k).permute(1, 2, 0)       # [H·W, n·K, C]
    return torch.bmm(lhs, rhs).transpose(0, 1)                              # [B, H·W, C]


def chunk_state(queries: Tensor, keys: Tensor, a: Tensor, inv2s2: Tensor, logw: Tensor, patch_size: int,
                scale: Tensor, ws: Workspace | None) -> SoftmaxState:
    """The streaming state (float64 m, l [B, H·W], acc [B, H·W, C]) of one chunk of n training images.

    queries [B, C, H, W]; keys [C, H, W, n, H·W]: K_n(u − δ), both the key patch's centre v = u − δ and the value
    of key (n, v) at query pixel u; a [B]; inv2s2 = 1/(2s²) [B] float64; logw [n]; scale [B]: the fixed-point
    scales; ws: reused buffers (None: differentiable, every step allocates). The logits ℓ = −dist/(2s²) + logw_n
    are −base/(2s²) (float64) + r with r = −excess/(2s²) + logw_n (small for the keys that matter); the weights
    exp(r − max r) are taken in base 2 (exp2 is the faster CPU kernel): r₂ = r·log₂e."""
    squares = squared_differences(queries, a, keys, ws)                   # [B, H, W, n, H·W(δ)]
    base, excess = split_distances(squares, patch_size, scale, ws)        # [B, H, W], [B, H, W, n, H·W]
    factor = (-inv2s2 * LOG2E).to(excess.dtype)[:, None, None, None, None]
    logw2 = logw * LOG2E                                                    # [n]
    top = (excess.detach().amin(dim=-1) * factor[..., 0] + logw2).amax(dim=-1)   # [B, H, W]: max r₂
    bias = (logw2 - top[..., None])[..., None]                             # [B, H, W, n, 1]
    floor = LOGIT_FLOOR * LOG2E
    if ws is not None:
        weights = excess.mul_(factor).add_(bias).clamp_min_(floor).exp2_()
    else:
        weights = (excess * factor + bias).clamp_min(floor).exp2()
    l = weights.sum(dim=(3, 4))                                             # [B, H, W]
    acc = weighted_values(weights, keys)                                    # [B, H·W, C]
    m = top.to(torch.float64) / LOG2E - base * inv2s2[:, None, None]       # the chunk's max logit (float64)
    return SoftmaxState(m.flatten(1), l.to(torch.float64).flatten(1), acc.to(torch.float64))


@contextmanager
def exact_matmul() -> Iterator[None]:
    """Full-precision float32 GEMMs for the weighted values: TF32 or bfloat16 (`set_float32_matmul_precision`
    'high' / 'medium') would cost ~1e-3 of every posterior mean; the setting is restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def box_posterior_torch(x: Tensor, alpha_bar: Tensor | float, images: Tensor, patch_size: int, *,
                        log_weights: Tensor | None = None, chunk_images: int | None = None,
                        memory_budget: float = DEFAULT_MEMORY_BUDGET,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """The ELS posterior mean (circular padding, one shared bank of all H·W circular P×P patches of every
    training image) of x [B, C, H, W] at ᾱ [B] (or a scalar) over images [N, C, H, W] with log-weights [N]
    (default uniform): x̂₀(u) = Σ_{n,v} softmax_{n,v}(−‖patch_u(x) − a·patch_v(K_n)‖²/(2s²) + logw_n)·K_n(v)
    (kamb-ganguli eq. 9–10), every distance a box sum of squares, computed in `dtype` (float32 or float64) on
    x's device in chunks of `chunk_images` training images (default: as many as fit `memory_budget` bytes).

    Returns [B, C, H, W] on x's device in x's dtype; differentiable in x. Raises PatchConfigError on a bad
    patch size, shapes, dtype or non-finite inputs, PatchMemoryError when one image per chunk does not fit."""
    ab, logw64 = check_inputs(x, alpha_bar, images, patch_size, log_weights)
    if dtype not in (torch.float32, torch.float64):
        raise PatchConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    device = x.device
    b, c, h, w = x.shape
    n, hw = images.shape[0], h * w
    images = images.to(device=device)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or images.requires_grad)
    per_chunk = plan_chunk(b, tuple(images.shape), torch.finfo(dtype).bits // 8, memory_budget, differentiable,
                           chunk_images, device)
    a64, s2 = noise_coefficients(ab)
    a, inv2s2, logw = a64.to(dtype), 1 / (2 * s2), logw64.to(dtype)
    scale = fixed_point_scales(x, a64, images, patch_size, dtype)
    index = shift_index(h, w, device)                                       # [H, W, H·W(δ)]
    queries = x.to(dtype)                                                   # [B, C, H, W]
    flat = images.to(dtype).reshape(n, c, hw)                               # [N, C, H·W]
    names = ("squares", "grid", "scratch") + (("diff",) if c > 1 else ())
    ws = None if differentiable else Workspace(names, b * per_chunk * hw * hw, dtype, device)
    state = None
    with exact_matmul():
        for start in range(0, n, per_chunk):
            keys = flat[start:start + per_chunk][:, :, index].permute(1, 2, 3, 0, 4).contiguous()
            # keys [C, H, W, n, H·W(δ)]: K_n(u − δ)
            part = chunk_state(queries, keys, a, inv2s2, logw[start:start + per_chunk], patch_size, scale, ws)
            state = part if state is None else merge(state, part)
    mean = finalize(state)                                                  # [B, H·W, C] float64
    return mean.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)


__all__ = ["Workspace", "box_posterior_torch", "box_sums", "chunk_bytes", "fixed_point_scales", "plan_chunk",
           "shift_index", "split_distances", "window_sums"]
