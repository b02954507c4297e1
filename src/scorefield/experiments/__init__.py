"""Each result as a function that wires the library together and writes a run directory."""
from .calibration import Calibration, calibrate
from .criticality_run import criticality_run
from .information_run import information_run
from .prediction import PredictResult, predict
from .sample_run import SampleConfig, run_sampling

__all__ = ["Calibration", "PredictResult", "SampleConfig", "calibrate", "criticality_run", "information_run",
           "predict", "run_sampling"]

LAZY_SUBMODULES = ("guidance_pulses", "process_comparison", "networks", "engine_log", "paper_runs")


def __getattr__(name: str):
    """Submodules load on first use (`sf.analysis.mosaic.patch_mosaic` works after `import scorefield as sf`)."""
    import importlib

    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
