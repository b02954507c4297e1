"""What a run directory holds, read for the report: tables (.csv, or .md alone), figures (.png) with the data
saved beside them, metrics.jsonl and the engine log. Every unreadable file is one ReportError naming it."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runs import RunDir, RunError
from .png import PNG_SIGNATURE

# folders of intermediate files (resume units, checkpoints, event files): listed, not rendered
INTERMEDIATE = ("batches", "parts", "steps", "checkpoints", "tb")


class ReportError(RunError):
    """A run directory (or one of its files) that a report cannot be written from."""


@dataclass
class Table:
    name: str                       # path relative to the run, without suffix
    rows: list[dict[str, Any]]
    columns: list[str]
    title: str | None


@dataclass
class Figure:
    name: str                       # path relative to the run
    png: bytes
    data: list[str]                 # files holding the numbers behind it (same stem: .npz, .csv)


def visible_files(run: RunDir, suffix: str | None = None) -> list[Path]:
    """The run's files (not hidden, not the report itself, not in intermediate folders), sorted by path."""
    out = []
    for path in sorted(run.path.rglob(f"*{suffix or ''}")):
        rel = path.relative_to(run.path)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts) or rel.parts[0] in INTERMEDIATE:
            continue
        if rel.name == "report.html":
            continue
        out.append(path)
    return out


def _number(text: str) -> Any:
    """A CSV cell as int, float or text (the CSV files hold numbers written by Python)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        reader = csv.DictReader(io.StringIO(path.read_text()))
        rows = [{k: _number(v) for k, v in r.items() if k is not None} for r in reader]
        return rows, list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"cannot read the table {path}: {exc}") from None


def read_markdown_table(path: Path) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """(rows, columns, title) of a Markdown table written by `runs.markdown_table` ('### title', '| a | b |')."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read the table {path}: {exc}") from None
    title = next((ln[4:].strip() for ln in lines if ln.startswith("### ")), None)
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.lstrip().startswith("|")]
    cells = [c for c in cells if not all(set(x) <= set("-: ") for x in c)]      # drop the |---| rule
    if not cells:
        return [], [], title
    columns = cells[0]
    return [dict(zip(columns, map(_number, c), strict=False)) for c in cells[1:]], columns, title


def tables(run: RunDir) -> list[Table]:
    """Every table of the run: each .csv (its title from the .md beside it), and each .md that has no .csv."""
    out = []
    for path in visible_files(run, ".csv"):
        rows, columns = read_csv(path)
        md = path.with_suffix(".md")
        title = read_markdown_table(md)[2] if md.is_file() else None
        out.append(Table(str(path.relative_to(run.path).with_suffix("")), rows, columns, title))
    for path in visible_files(run, ".md"):
        if not path.with_suffix(".csv").is_file():
            rows, columns, title = read_markdown_table(path)
            if columns:
                out.append(Table(str(path.relative_to(run.path).with_suffix("")), rows, columns, title))
    return sorted(out, key=lambda t: t.name)


def figures(run: RunDir) -> list[Figure]:
    out = []
    for path in visible_files(run, ".png"):
        png = path.read_bytes()
        if not png.startswith(PNG_SIGNATURE):
            raise ReportError(f"{path} is not a PNG image (truncated or corrupt?)")
        data = [str(p.relative_to(run.path)) for p in (path.with_suffix(".npz"), path.with_suffix(".csv"))
                if p.is_file()]
        out.append(Figure(str(path.relative_to(run.path)), png, data))
    return out


def arrays(run: RunDir, name: str) -> dict[str, np.ndarray]:
    """An .npz of the run, or one ReportError naming it."""
    path = run.file(name)
    if not path.is_file():
        raise ReportError(f"missing file {path}")
    try:
        return run.load_arrays(name)
    except Exception as exc:  # numpy raises several types for a damaged archive; the message names the file
        raise ReportError(f"cannot read {path} (truncated or corrupt?): {exc}") from None


def engine_summary(run: RunDir, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The engine summary of summary.json, else one computed from engine.jsonl, else None."""
    if isinstance(summary.get("engine"), dict):
        return summary["engine"]
    if run.exists("engine.jsonl"):
        from ..experiments import engine_log

        return engine_log.summarize(run)
    return None
