"""The two errors of the patch-posterior engine, shared by its geometry, key sources and streaming posterior.

A PatchConfigError is an invalid patch size, padding, grouping or bank (a ValueError); a PatchMemoryError is a
configuration whose memory estimate exceeds the budget (both a MemoryError and a ValueError). They live apart
from `patches` so that every module of the engine can raise them without importing the engine itself.
"""
from __future__ import annotations


class PatchConfigError(ValueError):
    """An invalid patch size, padding, grouping or bank."""


class PatchMemoryError(MemoryError, ValueError):
    """A configuration whose memory estimate exceeds the budget."""
