"""Patch geometry: which pixels form each patch, and which bank locations each query location may use.

A patch φ_Ωx is the P×P neighbourhood of pixel x (P odd), wrapped at the border for circular padding or
extended with zeros for zero padding, flattened channel-major into D = C·P·P values whose centre pixels ϕ(0)
are the posterior's values (kamb-ganguli eq. 9–10 / 39–40). Queries and bank are cut by the same index, so a
patch size larger than the image works as well. The grouping says which keys a query may use: one bank for all
pixels (ELS), one bank per location (LS), one bank per border class (boundary-broken ELS, eq. 41, App. B.2 and
Fig. 9); groups of equal size are batched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PatchConfigError

Tensor = torch.Tensor

PADDINGS = ("zeros", "circular")
# Patch indices and group layouts are small integer tables built once on the host; they move to the device of
# the tensors they index at the point of use.
HOST = torch.device("cpu")
GROUPINGS = ("shared", "location", "border")


def check_patch_size(patch_size: int) -> int:
    """An odd positive int patch size P, or a clear error."""
    if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0:
        raise PatchConfigError(f"patch_size must be an odd positive integer, got {patch_size!r}")
    return int(patch_size)


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise PatchConfigError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding


def patch_index(height: int, width: int, patch_size: int, padding: str) -> Tensor:
    """[H·W, P·P] indices into a flattened image with one extra zero pixel appended at index H·W.

    Row l lists the pixels of the P×P patch centred at location l = y·W + x in row-major (dy, dx) order:
    wrapped for circular padding, the zero pixel where the patch leaves the image for zero padding. Works for
    any P, also larger than the image.
    """
    r = patch_size // 2
    offs = torch.arange(-r, r + 1, device=HOST)
    ys = torch.arange(height, device=HOST)[:, None] + offs[None, :]          # [H, P]
    xs = torch.arange(width, device=HOST)[:, None] + offs[None, :]           # [W, P]
    if padding == "circular":
        ys, xs = ys % height, xs % width
        idx = ys[:, None, :, None] * width + xs[None, :, None, :]    # [H, W, P, P]
    else:
        inside = ((ys >= 0) & (ys < height))[:, None, :, None] & ((xs >= 0) & (xs < width))[None, :, None, :]
        idx = ys.clamp(0, height - 1)[:, None, :, None] * width + xs.clamp(0, width - 1)[None, :, None, :]
        idx = torch.where(inside, idx, torch.full_like(idx, height * width))
    return idx.reshape(height * width, patch_size * patch_size)


def centre_columns(channels: int, patch_size: int) -> Tensor:
    """Positions of the centre pixel (one per channel) in a flattened patch of D = C·P·P values."""
    r = patch_size // 2
    return torch.arange(channels, device=HOST) * patch_size * patch_size + r * patch_size + r


def gather_patches(images: Tensor, index: Tensor) -> Tensor:
    """Patches [N, L, C·P·P] of images [N, C, H, W] at the rows of a `patch_index` selection index [L, P·P]."""
    n, c = images.shape[:2]
    flat = torch.cat([images.reshape(n, c, -1), images.new_zeros(n, c, 1)], dim=2)   # [N, C, HW+1]
    patches = flat[:, :, index.to(images.device)]                                       # [N, C, L, PP]
    return patches.permute(0, 2, 1, 3).reshape(n, index.shape[0], -1)


def extract_patches(images: Tensor, patch_size: int, padding: str) -> Tensor:
    """All H·W patches [N, H·W, C·P·P] of images [N, C, H, W] (zero-extended or wrapped at the border)."""
    h, w = images.shape[-2:]
    return gather_patches(images, patch_index(h, w, patch_size, padding).to(images.device))


def border_classes(height: int, width: int, patch_size: int) -> Tensor:
    """[H·W, 4] border class of each pixel: distance to the top, left, bottom and right border, capped at
    (P−1)/2 (App. B.2, Fig. 9). Interior pixels share one class; a corner pixel whose patch sees two borders is
    alone in its class; edge pixels share a class with the pixels at the same distance to that edge."""
    r = patch_size // 2
    y = torch.arange(height, device=HOST)[:, None].expand(height, width)
    x = torch.arange(width, device=HOST)[None, :].expand(height, width)
    cls = torch.stack([y.clamp(max=r), x.clamp(max=r), (height - 1 - y).clamp(max=r),
                       (width - 1 - x).clamp(max=r)], dim=-1)
    return cls.reshape(height * width, 4)


@dataclass
class GroupBatch:
    """G groups of equal sizes: group g's queries sit at `query_locs[g]` and may use the bank patches centred
    at `key_locs[g]` (flat locations y·W + x) of every training image."""

    query_locs: Tensor  # [G, Lq]
    key_locs: Tensor    # [G, Lk]

    @property
    def groups(self) -> int:
        return self.query_locs.shape[0]


def group_layout(grouping: str, height: int, width: int, patch_size: int,
                 valid_only: bool = False) -> list[GroupBatch]:
    """Which bank locations each query location may use: 'shared' (ELS: any location; only patches that fit
    inside the image if `valid_only`), 'location' (LS: the same location), 'border' (bbELS: the same border
    class). Groups of equal size are batched into one GroupBatch."""
    hw = height * width
    everywhere = torch.arange(hw, device=HOST)
    if valid_only and grouping != "shared":
        raise PatchConfigError("valid_only applies to the shared (ELS) bank only")
    if grouping == "shared":
        keys = everywhere
        if valid_only:
            r = patch_size // 2
            y, x = everywhere // width, everywhere % width
            keys = everywhere[(y >= r) & (y < height - r) & (x >= r) & (x < width - r)]
            if keys.numel() == 0:
                raise PatchConfigError(f"no {patch_size}×{patch_size} patch fits inside a {height}×{width} image")
        return [GroupBatch(everywhere[None], keys[None])]
    if grouping == "location":
        return [GroupBatch(everywhere[:, None], everywhere[:, None])]
    if grouping == "border":
        _, cls = torch.unique(border_classes(height, width, patch_size), dim=0, return_inverse=True)
        members = [torch.nonzero(cls == c).reshape(-1) for c in range(int(cls.max()) + 1)]
        batches = []
        for size in sorted({len(m) for m in members}):
            locs = torch.stack([m for m in members if len(m) == size])
            batches.append(GroupBatch(locs, locs))
        return batches
    raise PatchConfigError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")

