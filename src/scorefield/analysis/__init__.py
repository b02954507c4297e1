"""Analyses of denoisers and trajectories."""
from . import classifiers as classifiers
from . import criticality as criticality
from . import eft as eft
from . import information as information
from .compare import AgreementError, agreement, agreement_table, per_sample_rows

__all__ = ["AgreementError", "agreement", "agreement_table", "per_sample_rows"]
