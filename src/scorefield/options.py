"""Checking names and option keys at the boundary, with the closest valid name in the message."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def closest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or '' when none is near."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def accepted_keys(fn: Callable[..., Any], skip: Iterable[str] = ()) -> list[str] | None:
    """The keyword options `fn` accepts (None when it takes **kwargs, i.e. anything)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    skipped = set(skip)
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY) and p.name not in skipped]


def unknown_options(options: Mapping[str, Any], fn: Callable[..., Any], skip: Iterable[str] = ()) -> str | None:
    """A one-line message naming every option `fn` does not accept, with the closest valid key; None if all fit."""
    valid = accepted_keys(fn, skip)
    if valid is None:
        return None
    bad = [k for k in options if k not in valid]
    if not bad:
        return None
    named = ", ".join(f"'{k}'{closest(k, valid)}" for k in bad)
    return f"unknown option{'s' if len(bad) > 1 else ''} {named}; valid: {', '.join(sorted(valid))}"
