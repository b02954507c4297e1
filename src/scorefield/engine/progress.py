"""One switch for the engine's own progress bars (long folds show one automatically): `set_progress(False)`
silences them, as the CLI's --no-progress does."""
from __future__ import annotations

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Show (True, the default) or hide the engine's progress bars."""
    global _ENABLED
    _ENABLED = bool(enabled)


def enabled() -> bool:
    return _ENABLED
