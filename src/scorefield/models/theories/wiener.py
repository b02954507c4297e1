"""The Wiener filter (the linear theory): the exact posterior mean E[x₀ | x] of Gaussian data with the training
set's mean and covariance, x̂₀ = μ + a Σ (a² Σ + s² I)⁻¹ (x − a μ), a = √ᾱ, s² = 1−ᾱ (`models.gaussian`).

`wiener` is the registry name the comparison tables use; unconditionally it is `gaussian` (same options).
`conditional=True` fits one Gaussian per class (its mean and covariance from that class's images) and uses the
label's at each sample; labels=None then uses the Gaussian of all images, as the conditional machines do.
"""
from __future__ import annotations

import torch

from ...data import ImageSet
from ..base import Denoiser
from ..gaussian import build_gaussian
from ..registry import ModelConfigError, register_model
from ._common import scatter_parts, split_batch

Tensor = torch.Tensor


class ClassWiener(Denoiser):
    """One Gaussian (Wiener) denoiser per class, and one over all images for labels=None."""

    name = "wiener"
    conditional = True
    unconditional_without_labels = True

    def __init__(self, data: ImageSet, covariance: str, shrinkage: float) -> None:
        super().__init__(tuple(data.images.shape[1:]), {"covariance": covariance, "conditional": True})
        if data.labels is None:
            raise ModelConfigError(f"wiener: conditional=True needs a labelled dataset; '{data.name}' has no labels")
        self.per_class = torch.nn.ModuleDict()
        for label in sorted(set(data.labels.tolist())):
            images = data.images[data.labels == label]
            if covariance == "full" and images.shape[0] < 2:
                raise ModelConfigError(f"wiener: class {label} has {images.shape[0]} image; a full covariance "
                                       f"per class needs at least 2")
            self.per_class[str(label)] = build_gaussian(ImageSet(images, name=f"{data.name}[{label}]"),
                                                        covariance=covariance, shrinkage=shrinkage)
        self.everything = build_gaussian(data, covariance=covariance, shrinkage=shrinkage)

    def denoise(self, x: Tensor, alpha_bar: Tensor, labels: Tensor | None) -> Tensor:
        keys = labels.tolist() if labels is not None else [None] * x.shape[0]
        outs, where = [], []
        for label, rows in split_batch(keys).items():
            if label is not None and str(label) not in self.per_class:
                raise ModelConfigError(f"wiener: no training image has label {label}")
            model = self.everything if label is None else self.per_class[str(label)]
            idx = torch.tensor(rows, device=x.device)
            outs.append(model.denoise(x[idx], alpha_bar[idx], None))
            where.append(idx)
        return scatter_parts(outs, where)


@register_model("wiener")
def build_wiener(data: ImageSet, covariance: str = "full", mean: Tensor | None = None, cov: Tensor | None = None,
                 spectrum: Tensor | None = None, shrinkage: float = 0.0, conditional: bool = False) -> Denoiser:
    """The Wiener filter of `data` (the `gaussian` model: covariance 'full' or 'fourier', optional shrinkage or
    given mean / cov / spectrum); conditional=True: one per class."""
    if not conditional:
        return build_gaussian(data, covariance=covariance, mean=mean, cov=cov, spectrum=spectrum,
                              shrinkage=shrinkage)
    if mean is not None or cov is not None or spectrum is not None:
        raise ModelConfigError("wiener: conditional=True fits each class's mean and covariance; it takes no "
                               "mean, cov or spectrum")
    if covariance not in ("full", "fourier"):
        raise ModelConfigError(f"covariance must be 'full' or 'fourier', got '{covariance}'")
    return ClassWiener(data, covariance, shrinkage)

