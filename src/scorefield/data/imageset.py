"""The one container for image data: an ImageSet holds [N, C, H, W] float images in [-1, 1]."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


class DataError(ValueError):
    """A dataset could not be read or does not have the expected form."""


@dataclass
class ImageSet:
    """Images [N, C, H, W] float32 in [-1, 1], optional integer labels [N], and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    name: str = "images"
    class_names: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = torch.as_tensor(self.images)
        if images.ndim != 4:
            raise DataError(f"ImageSet '{self.name}': images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise DataError(f"ImageSet '{self.name}': images must be floating point in [-1, 1], got {images.dtype}")
        images = images.to(torch.float32)
        if images.numel():
            # min and max are NaN / ±inf exactly when some pixel is, so two reductions check both at once
            lo, hi = images.min().item(), images.max().item()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise DataError(f"ImageSet '{self.name}': images contain NaN or infinite values")
            if lo < -1 - 1e-5 or hi > 1 + 1e-5:
                raise DataError(f"ImageSet '{self.name}': pixel values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
        self.images = images.clamp(-1, 1).contiguous()
        if self.labels is not None:
            labels = torch.as_tensor(self.labels).to(torch.int64).reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise DataError(f"ImageSet '{self.name}': {labels.shape[0]} labels for {images.shape[0]} images")
            self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    @property
    def num_classes(self) -> int:
        """Number of classes: len(class_names) if given, else max label + 1, else 0 (unlabelled)."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is None or len(self.labels) == 0:
            return 0
        return int(self.labels.max().item()) + 1

    def select(self, index: torch.Tensor | list[int], note: str | None = None) -> ImageSet:
        """A new ImageSet holding the images at `index` (provenance records the note)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        provenance = dict(self.provenance)
        if note:
            provenance.setdefault("operations", [])
            provenance["operations"] = [*provenance["operations"], note]
        return ImageSet(self.images[index], None if self.labels is None else self.labels[index],
                        name=self.name, class_names=self.class_names, provenance=provenance)

    def of_class(self, label: int) -> ImageSet:
        """The images whose label is `label`."""
        if self.labels is None:
            raise DataError(f"ImageSet '{self.name}' has no labels, so it cannot be filtered by class")
        return self.select(torch.nonzero(self.labels == int(label)).reshape(-1), note=f"class {label}")

    def summary(self) -> dict[str, Any]:
        """Plain-data description (for `scorefield data info` and run directories)."""
        info: dict[str, Any] = {
            "name": self.name, "n": len(self), "channels": self.channels,
            "height": self.height, "width": self.width,
            "min": float(self.images.min()) if len(self) else None,
            "max": float(self.images.max()) if len(self) else None,
            "mean": float(self.images.mean()) if len(self) else None,
            "num_classes": self.num_classes,
        }
        if self.labels is not None:
            info["class_counts"] = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        if self.class_names is not None:
            info["class_names"] = list(self.class_names)
        info["provenance"] = self.provenance
        return info
