"""Run directories: every result is a folder with config.json, environment.json, metrics.jsonl, arrays
(.npz), tables (.csv + .md) and figures (.png). Nothing is overwritten; files are written atomically, so an
interrupted job leaves only complete files behind and can resume from them.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__


class RunError(RuntimeError):
    """A run directory is missing, malformed, or a write would overwrite a result."""


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # tensors, arrays
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


# run directories this process has held (most recent last): an interrupted command names one in its resume hint
ACTIVE_RUNS: list[Path] = []
# the scorefield command line being run (set by the CLI): recorded in environment.json so that a resume can parse
# it again; None for runs made from Python
COMMAND_LINE: list[str] | None = None


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the `.NAME.tmp-PID` files that a killed writer left (never a finished file)."""
    for tmp in folder.rglob(".*.tmp-*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


class DeferredInterrupt:
    """Within `with DeferredInterrupt() as stop:`, Ctrl-C (SIGINT) only sets `stop.requested`; the loop checks
    it at a unit boundary, saves what it has, and raises KeyboardInterrupt itself, so a checkpoint is never
    taken half-way through a step. A second Ctrl-C interrupts at once. Outside the main thread, a no-op."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> DeferredInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def read_json_file(path: Path, error: type[Exception] = RunError) -> Any:
    """A JSON file, or one `error` naming the file (missing, truncated, not JSON)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON (truncated or corrupt?): {exc}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def environment_info(seed: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Versions, machine and device: enough to tell where a number came from."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__, "cuda_available": torch.cuda.is_available(),
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu"), "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
    }
    if COMMAND_LINE is not None:
        info["command"], info["cwd"] = list(COMMAND_LINE), os.getcwd()
    try:
        info["scorefield"] = __version__
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except Exception:  # the environment record is best-effort; a missing git must not stop a run
        pass
    return info


class RunDir:
    """A results folder. Create with `RunDir.create(...)`, reopen (to resume or read) with `RunDir.open(path)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle: Any = None

    def lock(self) -> RunDir:
        """Hold this run directory for this process (an advisory file lock on .lock, released when the process
        ends): a second process resuming the same run gets a RunError at once instead of computing the same
        work and failing later. Returns self; a no-op where file locks are unavailable."""
        if self._lock_handle is not None:
            return self
        try:
            import fcntl
        except ImportError:   # pragma: no cover - not on POSIX
            return self
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"{self.path} is being worked on by {holder}; wait for it to finish (or stop it) "
                           f"before resuming") from None
        except OSError:       # the file system refuses locks: go on unguarded
            handle.close()
            return self
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._lock_handle = handle
        _remove_stale_temporaries(self.path)       # we hold the run: no other writer can be mid-write
        ACTIVE_RUNS.append(self.path)
        return self

    def release(self) -> RunDir:
        """Give up the hold taken by `lock` (a job calls it when it is done); returns self."""
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None
        return self

    # ---- creating and opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, kind: str, config: Mapping[str, Any], root: str | Path = "runs", name: str | None = None,
               seed: int | None = None, device: str | None = None) -> RunDir:
        """A new run folder root/<name or kind-YYYYmmdd-HHMMSS>[-k]; never reuses an existing folder."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        base = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        for k in range(10_000):
            path = root / (base if k == 0 else f"{base}-{k}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover
            raise RunError(f"could not find a free run directory name under {root}")
        run = cls(path)
        run.write_json("config.json", {"kind": kind, **config})
        run.write_json("environment.json", environment_info(seed=seed, device=device))
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run folder (it must hold a config.json)."""
        run = cls(path)
        if not (run.path / "config.json").is_file():
            raise RunError(f"{run.path} is not a run directory (no config.json)")
        return run

    @property
    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def _target(self, name: str, replace: bool) -> Path:
        target = self.path / name
        if target.exists() and not replace:
            raise RunError(f"refusing to overwrite {target}: results are never overwritten")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    # ---- writing -----------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any, replace: bool = False) -> Path:
        target = self._target(name, replace)
        atomic_write_bytes(target, (json.dumps(jsonable(obj), indent=2) + "\n").encode())
        return target

    def read_json(self, name: str) -> Any:
        """A JSON file of the run, or one RunError naming the file (missing, truncated, not JSON)."""
        return read_json_file(self.path / name)

    def log_metrics(self, **values: Any) -> None:
        """Append one JSON line to metrics.jsonl (first cutting a torn last line left by a killed process)."""
        _drop_torn_tail(self.path / "metrics.jsonl")
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(jsonable(values)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The lines of metrics.jsonl; a torn last line (a process killed mid-append) is skipped, a damaged
        line elsewhere is an error naming the file and line."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise RunError(f"{path} line {i + 1} is not valid JSON: {line[:80]!r}") from None
        return out

    def save_arrays(self, name: str, replace: bool = False, **arrays: Any) -> Path:
        """Save named arrays (tensors or numpy) as `name`.npz, atomically."""
        name = name if name.endswith(".npz") else f"{name}.npz"
        target = self._target(name, replace)
        buf = io.BytesIO()
        np.savez(buf, **{k: _to_numpy(v) for k, v in arrays.items()})
        atomic_write_bytes(target, buf.getvalue())
        return target

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        name = name if name.endswith(".npz") else f"{name}.npz"
        with np.load(self.path / name) as z:
            return {k: z[k] for k in z.files}

    def save_table(self, name: str, rows: Iterable[Mapping[str, Any]], replace: bool = False,
                   title: str | None = None) -> Path:
        """Save rows of dicts as `name`.csv and a Markdown `name`.md; returns the csv path."""
        rows = [dict(r) for r in rows]
        columns: list[str] = []
        for r in rows:
            columns += [c for c in r if c not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        csv_path = self._target(f"{name}.csv", replace)
        atomic_write_bytes(csv_path, text.getvalue().encode())
        atomic_write_bytes(self._target(f"{name}.md", replace),
                           markdown_table(rows, columns, title=title).encode())
        return csv_path

    def save_figure(self, name: str, fig: Any, replace: bool = False, dpi: int = 120) -> Path:
        """Save a matplotlib figure as `name`.png (and close it)."""
        import matplotlib.pyplot as plt

        target = self._target(name if name.endswith(".png") else f"{name}.png", replace)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(target, buf.getvalue())
        return target


def _drop_torn_tail(path: Path) -> None:
    """Cut an appended log back to its last complete line (one ending in a newline)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, 2)
        if fh.read(1) == b"\n":
            return
        data = fh.seek(0) or fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None, title: str | None = None) -> str:
    """Rows of dicts as a Markdown table."""
    columns = columns or (list(rows[0]) if rows else [])
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"
