"""Each result as a function that wires the library together and writes a run directory."""
from .sample_run import SampleConfig, run_sampling

__all__ = ["SampleConfig", "run_sampling"]
