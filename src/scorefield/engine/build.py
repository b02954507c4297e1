"""Building, caching, loading and self-checking the compiled kernels of `scorefield/engine/csrc`.

A kernel source is compiled at first use with the system C++ compiler into a plain shared library, cached
under `$SCOREFIELD_CACHE` (default `~/.cache/scorefield`) and called through ctypes. See `build_library` for
the cache key and the guarantees around concurrent builds, and `CompiledKernel` for the self-check.

Set `SCOREFIELD_KERNEL=reference` to disable every compiled path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BUILD_TIMEOUT_S = 120
CSRC = Path(__file__).resolve().parent / "csrc"


def cache_dir() -> Path:
    """Where compiled kernels are kept (`$SCOREFIELD_CACHE`, else `$XDG_CACHE_HOME/scorefield`)."""
    root = os.environ.get("SCOREFIELD_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scorefield"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build_library(source: Path) -> Path:
    """Compile a kernel source of `scorefield/csrc` (or reuse the cached build) and return the library's path.

    The cache key covers the source, the headers beside it, the compiler, the flags and the CPU."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join((cxx, *CXX_FLAGS)).encode() + _cpu_signature().encode())
    target = cache_dir() / "kernels" / key.hexdigest()[:16] / f"lib{source.stem}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([cxx, *CXX_FLAGS, str(source), "-o", str(partial)], capture_output=True,
                                text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {result.stderr.strip()[:500]}")
        os.replace(partial, target)  # atomic: concurrent builders end with one complete file
    return target


def open_library(source: Path, declare, what: str, fallback: str) -> ctypes.CDLL | None:
    """Build (or reuse) and load a kernel of `scorefield/csrc`, declaring its C functions with `declare(lib)`;
    None, with one warning naming `what` and the `fallback`, when that fails or SCOREFIELD_KERNEL=reference."""
    if os.environ.get("SCOREFIELD_KERNEL", "").lower() == "reference":
        return None
    try:
        lib = ctypes.CDLL(str(build_library(source)))
        declare(lib)
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"scorefield: compiled {what} unavailable, using {fallback} ({err})", RuntimeWarning,
                      stacklevel=4)
        return None


class CompiledKernel:
    """A kernel of `scorefield/csrc`, built, loaded and checked against its reference once, at first use.

    `declare(lib)` declares its C functions; `self_check()` runs it (through `library`) against the reference
    on a small input. `what` and `fallback` name it and the path used instead in the one warning given when
    it cannot be built or fails the check."""

    def __init__(self, source: Path, declare, what: str, fallback: str, self_check) -> None:
        self.source, self._declare, self.what, self.fallback = source, declare, what, fallback
        self._self_check = self_check
        self._lock = threading.Lock()
        self._state = "unloaded"   # unloaded | ready | unavailable
        self.library: ctypes.CDLL | None = None

    def available(self) -> bool:
        """True when the kernel is built, loaded and agrees with its reference (loads it on the first call)."""
        with self._lock:
            if self._state != "unloaded":
                return self._state == "ready"
            self._state = "unavailable"
            self.library = open_library(self.source, self._declare, self.what, self.fallback)
            if self.library is None:
                return False
            self._state = "ready"
        if not self._self_check():
            with self._lock:
                self._state = "unavailable"
            warnings.warn(f"scorefield: compiled {self.what} failed its self-check, using {self.fallback}",
                          RuntimeWarning, stacklevel=3)
            return False
        return True
