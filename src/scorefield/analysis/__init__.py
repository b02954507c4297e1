"""Analyses of denoisers and trajectories."""
from . import classifiers as classifiers
from . import criticality as criticality
from . import eft as eft
from . import information as information
from .compare import AgreementError, agreement, agreement_table, per_sample_rows

__all__ = ["AgreementError", "agreement", "agreement_table", "per_sample_rows"]

LAZY_SUBMODULES = ("consistency", "mosaic", "nearest", "receptive_field", "figures", "prediction_figures",
                   "calibration_figure", "criticality_figures")


def __getattr__(name: str):
    """Submodules load on first use (`sf.analysis.mosaic.patch_mosaic` works after `import scorefield as sf`)."""
    import importlib

    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
