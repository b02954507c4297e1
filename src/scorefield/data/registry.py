"""Name → loader registry behind `sf.data.load`."""
from __future__ import annotations

from collections.abc import Callable

from ..options import closest
from .imageset import DataError, ImageSet

Loader = Callable[..., ImageSet]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make `loader(split=..., **options) -> ImageSet` available as `sf.data.load(name)`."""
    def wrap(loader: Loader) -> Loader:
        DATASETS[name] = loader
        return loader
    return wrap


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def get_loader(name: str) -> Loader:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'{closest(name, DATASETS)}; "
                        f"available: {', '.join(available_datasets())}")
    return DATASETS[name]
