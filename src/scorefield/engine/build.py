"""Building, caching, loading and self-checking the compiled kernels of `scorefield/engine/csrc`.

A kernel source is compiled at first use with the system C++ compiler into a plain shared library, cached
under `$SCOREFIELD_CACHE` (default `~/.cache/scorefield`) and called through ctypes. See `build_library` for
the cache key and the guarantees around concurrent builds, and `CompiledKernel` for the self-check.

Why a plain compiler call rather than `torch.utils.cpp_extension`, nanobind or an ahead-of-time build: the
kernels are C ABI functions on raw pointers with no torch or Python headers, so bindings buy nothing;
cpp_extension's JIT build needs ninja and torch's headers (a file that only includes torch/extension.h takes 33 s
to compile here) and ties each binary to one torch ABI; an ahead-of-time wheel cannot use -march=native. One
plain g++ 12 call takes 5 s (patch_softmax.cpp) and 13 s (box_softmax.cpp) on 2 cores here, once per machine.

Set `SCOREFIELD_KERNEL=reference` to disable every compiled path, `SCOREFIELD_QUIET=1` to silence the one-line
notice printed to stderr while a kernel compiles.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders then each compile (see `_exclusive`)
    fcntl = None

CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BUILD_TIMEOUT_S = 120
CSRC = Path(__file__).resolve().parent / "csrc"


class NoCompilerError(RuntimeError):
    """No C++ compiler on this machine: every kernel fails alike, so it is reported once (`open_library`)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (`$SCOREFIELD_CACHE`, else `$XDG_CACHE_HOME/scorefield`)."""
    root = os.environ.get("SCOREFIELD_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scorefield"


def _cpuinfo_line(prefixes: tuple[str, ...]) -> str:
    """The first line of /proc/cpuinfo starting with one of `prefixes` ('' when absent); OSError off Linux."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((ln for ln in lines if ln.startswith(prefixes)), "")


def _cpu_signature() -> str:
    try:
        return _cpuinfo_line(("model name",)) + _cpuinfo_line(("flags", "Features"))
    except OSError:
        return platform.processor() + platform.machine()


def _cpu_flags() -> list[str] | None:
    """The instruction-set flags of this CPU (x86 'flags', Arm 'Features'), or None where /proc/cpuinfo is not."""
    try:
        return sorted(_cpuinfo_line(("flags", "Features")).partition(":")[2].split())
    except OSError:
        return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@functools.cache
def _compiler_version(cxx: str) -> str:
    """First line of `cxx --version`: a compiler upgrade changes the code it emits, so it is part of the key."""
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (result.stdout.splitlines() or ["unknown"])[0]


def _build_record(cxx: str) -> dict:
    """What a library depends on beyond its source: written beside it at build time, checked at load time."""
    return {"compiler": _compiler_version(cxx), "flags": list(CXX_FLAGS), "cpu_flags": _cpu_flags(),
            "processor": platform.processor(), "libc": list(platform.libc_ver())}


def _record_path(library: Path) -> Path:
    return library.with_suffix(".json")


def _stale_reason(library: Path) -> str | None:
    """None when `library` is built and was built for instructions this CPU has; else why it must be built.

    The cache key already holds the CPU signature; this re-check guards shared (NFS) and copied caches, where
    a -march=native binary could otherwise meet a CPU without its instructions and die of SIGILL."""
    if not library.exists():
        return "not built yet"
    try:
        record = json.loads(_record_path(library).read_text())
    except (OSError, ValueError):
        return "its build record is missing or unreadable"
    here = _cpu_flags()
    if here is None or record.get("cpu_flags") is None:
        if record.get("processor") != platform.processor():
            return f"it was built on processor {record.get('processor')!r}, this is {platform.processor()!r}"
        return None
    missing = sorted(set(record["cpu_flags"]) - set(here))
    if missing:
        return f"it was built for a CPU with instructions this one lacks ({', '.join(missing[:8])})"
    return None


def _notice(message: str) -> None:
    """One line on stderr, unless SCOREFIELD_QUIET is set: a first call that stalls for seconds says why."""
    if not os.environ.get("SCOREFIELD_QUIET"):
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on `lock_path` (created if needed): N processes starting at once build once.

    Where locks are not to be had (no fcntl, a read-only cache, a file system refusing locks) it goes on
    unguarded: concurrent builders then each compile, and the atomic renames still leave one whole library."""
    handle = None
    if fcntl is not None:
        try:
            handle = open(lock_path, "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            if handle is not None:
                handle.close()
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock


def _compile(source: Path, cxx: str, target: Path, reason: str) -> None:
    """Compile `source` into `target`, then write its build record: library first, record second, both by atomic
    rename, so that a reader that finds a matching record also finds the library it describes."""
    why = "" if reason == "not built yet" else f" ({reason})"
    _notice(f"scorefield: compiling {source.name} once (5-20 s) into {target}{why}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([cxx, *CXX_FLAGS, str(source), "-o", str(partial)], capture_output=True,
                                text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {result.stderr.strip()[:500]}")
        os.replace(partial, target)
        record = Path(tmp) / "record.json"
        record.write_text(json.dumps(_build_record(cxx), indent=1))
        os.replace(record, _record_path(target))


def library_path(source: Path, cxx: str) -> Path:
    """Where the build of `source` by `cxx` lives: keyed by the source, the headers beside it, the compiler and
    its version, the flags, the CPU and the C library, so that a change to any of them builds anew."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    context = [cxx, _compiler_version(cxx), *CXX_FLAGS, _cpu_signature(), *platform.libc_ver(), platform.machine()]
    key = hashlib.sha256(text + "\n".join(context).encode())
    return cache_dir() / "kernels" / key.hexdigest()[:16] / f"lib{source.stem}.so"


def build_library(source: Path) -> Path:
    """Compile a kernel source of `scorefield/csrc` (or reuse the cached build) and return the library's path.

    The key is `library_path`'s. The build runs under a file lock beside the library, so that processes
    starting at once compile once: the others wait, then find the finished library. A cached library whose
    build record does not match this CPU (`_stale_reason`) is rebuilt in place."""
    cxx = _compiler()
    if cxx is None:
        raise NoCompilerError("no C++ compiler found (set CXX)")
    target = library_path(source, cxx)
    if _stale_reason(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_suffix(".lock")):
        reason = _stale_reason(target)  # another process may have built it while this one waited
        if reason is not None:
            _compile(source, cxx, target, reason)
    return target


@functools.cache
def _warn_no_compiler() -> None:
    """The one warning of a process without a compiler (the kernels would each say the same)."""
    warnings.warn("scorefield: no C++ compiler found (set CXX): the compiled kernels are off and their slower "
                  "fallbacks run", RuntimeWarning, stacklevel=6)


def open_library(source: Path, declare, what: str, fallback: str) -> ctypes.CDLL | None:
    """Build (or reuse) and load a kernel of `scorefield/csrc`, declaring its C functions with `declare(lib)`;
    None, with one warning naming `what` and the `fallback`, when that fails or SCOREFIELD_KERNEL=reference
    (when there is no compiler at all, one warning for all kernels)."""
    if os.environ.get("SCOREFIELD_KERNEL", "").lower() == "reference":
        return None
    try:
        lib = ctypes.CDLL(str(build_library(source)))
        declare(lib)
        return lib
    except NoCompilerError:
        _warn_no_compiler()
        return None
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"scorefield: compiled {what} unavailable, using {fallback} ({err})", RuntimeWarning,
                      stacklevel=5)
        return None


class CompiledKernel:
    """A kernel of `scorefield/csrc`, built, loaded and checked against its reference once, at first use.

    `declare(lib)` declares its C functions; `self_check()` runs it (through `library`, without asking
    `available()`) against the reference on small inputs that take every branch of the kernel. `what` and
    `fallback` name it and the path used instead in the one warning given when it cannot be built or fails the
    check. It counts as available only once the check has passed: until then other threads wait on the lock."""

    def __init__(self, source: Path, declare, what: str, fallback: str, self_check) -> None:
        self.source, self._declare, self.what, self.fallback = source, declare, what, fallback
        self._self_check = self_check
        self._lock = threading.RLock()
        self._state = "unloaded"   # unloaded | checking | ready | unavailable
        self.library: ctypes.CDLL | None = None

    def available(self) -> bool:
        """True when the kernel is built, loaded and agrees with its reference (loads it on the first call).

        A self-check that asked again from its own thread would get False ("checking"), not a deadlock."""
        with self._lock:
            if self._state == "unloaded":
                self._state = "checking"
                self._state = self._load()
            return self._state == "ready"

    def _load(self) -> str:
        """Open the library and run the self-check (the lock held): the state the kernel ends in."""
        self.library = open_library(self.source, self._declare, self.what, self.fallback)
        if self.library is None:
            return "unavailable"
        try:
            passed, detail = bool(self._self_check()), ""
        except Exception as err:  # any failure of the check means the kernel must not be used
            passed, detail = False, f" ({err})"
        if passed:
            return "ready"
        self.library = None
        warnings.warn(f"scorefield: compiled {self.what} failed its self-check{detail}, using {self.fallback}",
                      RuntimeWarning, stacklevel=4)
        return "unavailable"
