"""Each result as a function that wires the library together and writes a run directory."""
from .calibration import Calibration, calibrate
from .criticality_run import criticality_run
from .information_run import information_run
from .prediction import PredictResult, predict
from .sample_run import SampleConfig, run_sampling

__all__ = ["Calibration", "PredictResult", "SampleConfig", "calibrate", "criticality_run", "information_run",
           "predict", "run_sampling"]
