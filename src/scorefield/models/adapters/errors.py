"""The adapters' one error type."""
from __future__ import annotations

from ..registry import ModelConfigError


class AdapterError(ModelConfigError):
    """An external model or scheduler that an adapter cannot represent faithfully (unsupported prediction type,
    no ᾱ table, a text-conditioned UNet, mismatched channels), or an adapter called with invalid options."""
