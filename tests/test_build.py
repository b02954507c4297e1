"""Building, caching, locking and self-checking the compiled kernels (`engine.build`).

Most tests compile a one-function source instead of a real kernel: the same build path, in well under a second."""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from scorefield.engine import box, build, fused

needs_compiler = pytest.mark.skipif(build._compiler() is None, reason="no C++ compiler")
TINY = "extern \"C\" int sf_answer() { return ANSWER; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty kernel cache, with the build notice on and the compiled paths allowed."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SCOREFIELD_CACHE", str(root))
    monkeypatch.delenv("SCOREFIELD_QUIET", raising=False)
    monkeypatch.delenv("SCOREFIELD_KERNEL", raising=False)
    return root


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    """A one-function kernel source with a header beside it (headers are part of the cache key)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "answer.h").write_text("#define ANSWER 42\n")
    (src / "tiny.cpp").write_text('#include "answer.h"\n' + TINY)
    return src / "tiny.cpp"


@pytest.fixture
def fresh_warning_memo():
    build._warn_no_compiler.cache_clear()
    yield
    build._warn_no_compiler.cache_clear()


def _answer(library: Path) -> int:
    return ctypes.CDLL(str(library)).sf_answer()


@needs_compiler
def test_build_notice_once_then_cached_with_its_record(cache, tiny_source, capsys):
    library = build.build_library(tiny_source)
    notice = capsys.readouterr().err
    assert notice.count("scorefield: compiling tiny.cpp") == 1 and str(library) in notice
    assert library.is_relative_to(cache) and _answer(library) == 42
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["compiler"] == build._compiler_version(build._compiler())
    assert record["flags"] == list(build.CXX_FLAGS) and record["cpu_flags"] == build._cpu_flags()
    assert build.build_library(tiny_source) == library
    assert capsys.readouterr().err == ""                       # cached: silent


@needs_compiler
def test_quiet_build(cache, tiny_source, capsys, monkeypatch):
    monkeypatch.setenv("SCOREFIELD_QUIET", "1")
    build.build_library(tiny_source)
    assert capsys.readouterr().err == ""


def test_cache_key_covers_source_headers_flags_cpu_compiler_version_and_libc(tiny_source, monkeypatch):
    monkeypatch.setattr(build, "_compiler_version", lambda cxx: "g++ 12.2.0")
    base = build.library_path(tiny_source, "g++")

    def path_with(target, name, value) -> Path:
        with monkeypatch.context() as patch:
            patch.setattr(target, name, value)
            return build.library_path(tiny_source, "g++")

    assert path_with(build, "_compiler_version", lambda cxx: "g++ 13.1.0") != base
    assert path_with(build.platform, "libc_ver", lambda: ("glibc", "0.1")) != base
    assert path_with(build, "_cpu_signature", lambda: "another cpu") != base
    assert path_with(build, "CXX_FLAGS", (*build.CXX_FLAGS, "-g")) != base
    assert build.library_path(tiny_source, "clang++") != base
    assert build.library_path(tiny_source, "g++") == base
    (tiny_source.parent / "answer.h").write_text("#define ANSWER 43\n")
    assert build.library_path(tiny_source, "g++") != base


@needs_compiler
@pytest.mark.skipif(build._cpu_flags() is None, reason="no /proc/cpuinfo")
def test_library_recorded_for_other_cpu_flags_is_not_loaded_but_rebuilt(cache, tiny_source, capsys):
    library = build.build_library(tiny_source)
    record_path = library.with_suffix(".json")
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "cpu_flags": [*record["cpu_flags"], "sf_fake_flag"]}))
    assert "sf_fake_flag" in build._stale_reason(library)
    capsys.readouterr()
    assert build.build_library(tiny_source) == library
    notice = capsys.readouterr().err
    assert "compiling tiny.cpp" in notice and "sf_fake_flag" in notice
    assert json.loads(record_path.read_text())["cpu_flags"] == build._cpu_flags()
    assert build._stale_reason(library) is None and _answer(library) == 42


def test_stale_reasons_without_record_or_cpu_flags(tmp_path, monkeypatch):
    library = tmp_path / "libx.so"
    assert build._stale_reason(library) == "not built yet"
    library.write_bytes(b"")
    assert "record" in build._stale_reason(library)
    monkeypatch.setattr(build, "_cpu_flags", lambda: None)          # no /proc/cpuinfo: the processor decides
    library.with_suffix(".json").write_text(json.dumps({"cpu_flags": None, "processor": "other-cpu"}))
    assert "other-cpu" in build._stale_reason(library)
    library.with_suffix(".json").write_text(json.dumps({"cpu_flags": None,
                                                         "processor": build.platform.processor()}))
    assert build._stale_reason(library) is None


def test_one_warning_for_all_kernels_without_compiler(cache, monkeypatch, fresh_warning_memo):
    monkeypatch.setattr(build, "_compiler", lambda: None)
    kernels = [build.CompiledKernel(k.SOURCE, k._declare, k._KERNEL.what, k._KERNEL.fallback, k._self_check)
               for k in (fused, box)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not any(k.available() for k in kernels)
    assert [str(w.message) for w in caught] == [
        "scorefield: no C++ compiler found (set CXX): the compiled kernels are off and their slower fallbacks run"]


def _fake_kernel(monkeypatch, self_check) -> build.CompiledKernel:
    """A kernel whose library 'loads' without a compiler: only the state machine around the self-check runs."""
    monkeypatch.setattr(build, "open_library", lambda *args: object())
    return build.CompiledKernel(Path("fake.cpp"), None, "fake kernel", "the reference", self_check)


def test_kernel_is_not_usable_before_its_self_check_passed(monkeypatch):
    checked = threading.Event()

    def slow_check():
        time.sleep(0.2)
        checked.set()
        return True

    kernel = _fake_kernel(monkeypatch, slow_check)
    seen = []

    def use():
        seen.append((kernel.available(), checked.is_set()))

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert seen == [(True, True)] * 4


def test_failed_or_reentrant_self_check_disables_the_kernel_once(monkeypatch):
    kernel = _fake_kernel(monkeypatch, lambda: kernel.available())   # asks again from inside: False, no deadlock
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = []
        worker = threading.Thread(target=lambda: done.append(kernel.available()))
        worker.start()
        worker.join(timeout=10)
        assert done == [False] and kernel.library is None
        assert not kernel.available()
    assert len(caught) == 1 and "failed its self-check" in str(caught[0].message)


def test_self_check_raising_counts_as_failed(monkeypatch):
    def broken():
        raise ValueError("uncovered case")

    kernel = _fake_kernel(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="self-check .*uncovered case"):
        assert not kernel.available()


def test_box_self_check_reaches_every_case_of_the_kernel_dispatch():
    """Mirror of sf_box_posterior's switch: (vectors per group G, channels C, paired layout)."""
    reached = set()
    for c, h, w, p in box._self_check_shapes():
        assert box.covers((2, c, h, w), p)
        paired = w % 8 == 4 and h % 2 == 0 and w <= 28
        reached.add((w // 4 if paired else (w + 7) // 8, c, paired))
    every = {(g, c, False) for g in range(1, 9) for c in range(1, 5)}
    every |= {(g, c, True) for g in (1, 3, 5, 7) for c in range(1, 5)}
    assert reached == every


BUILDER = textwrap.dedent("""
    import pathlib, sys, time
    from scorefield.engine import build
    ready, name, source = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    (ready / name).touch()
    deadline = time.time() + 60
    while len(list(ready.iterdir())) < int(sys.argv[4]) and time.time() < deadline:
        time.sleep(0.01)
    print(build.build_library(source))
""")


@needs_compiler
def test_processes_starting_at_once_compile_once(cache, tiny_source, tmp_path):
    """Three processes build the same kernel at the same moment: one compiles (the compiler is slowed down to
    widen the race), the others wait on the lock and find the finished library."""
    counter, ready = tmp_path / "compiles", tmp_path / "ready"
    ready.mkdir()
    wrapper, cxx = tmp_path / "cxx", shlex.quote(shutil.which(build._compiler()))
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *--version*) exec {cxx} "$@";; esac\n'
                       f'echo run >> {shlex.quote(str(counter))}\nsleep 1\nexec {cxx} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CXX": str(wrapper), "SCOREFIELD_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(ready), str(i), str(tiny_source), "3"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert counter.read_text().count("run") == 1
    assert sum(err.count("scorefield: compiling") for _, err in results) == 1
    assert _answer(Path(results[0][0].strip())) == 42


FLOAT64_CALLS = textwrap.dedent("""
    import torch
    import scorefield as sf
    from scorefield.engine import box, fused, kernels
    gen = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1, name="uniform")
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    sf.models.make("els", data, patch_size=3, dtype="float64")(x, torch.tensor([0.5, 0.9], dtype=torch.float64))
    q, k = torch.randn(5, 9, dtype=torch.float64), torch.randn(30, 9, dtype=torch.float64)
    b, v = torch.randn(30, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    kernels.accumulate(kernels.init_state((5,), 2, dtype=torch.float64), q, k, b, v, 0.5)
    assert fused._KERNEL._state == box._KERNEL._state == "unloaded", (fused._KERNEL._state, box._KERNEL._state)
""")


def test_float64_calls_never_compile(cache):
    result = subprocess.run([sys.executable, "-c", FLOAT64_CALLS], env={**os.environ, "SCOREFIELD_CACHE": str(cache)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "scorefield: compiling" not in result.stderr
    assert not list(cache.rglob("*.so"))
