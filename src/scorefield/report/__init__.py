"""Run reports: one static, self-contained `report.html` in a run directory (no server, no network).

`write_report(run_dir)` reads what the run wrote — config.json, summary.json, environment.json, every table
(.csv / .md), every figure (.png, embedded) with the files holding its data, metrics.jsonl, the engine log —
and renders it. Kinds with more to show get their own section: prediction runs the network / theory / IS grids
with each sample's r² and Pearson r, sampling runs with a mosaic.npz the patch provenance of every pixel on
hover. Any other kind (and any future one) gets the generic report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runs import RunDir, RunError, atomic_write_bytes, read_json_file
from . import contents, html, sections
from .contents import ReportError
from .png import data_uri

REPORT = "report.html"
MAX_SAMPLES = 64
METRIC_ROWS = 100

KINDS = {
    "sample": "samples drawn from a denoiser, with the memorization check",
    "train": "a denoiser trained by denoising score matching",
    "calibrate": "patch-size calibration of a machine against a network (kamb-ganguli App. C.2)",
    "predict": "sample-by-sample prediction of a network by analytic theories (kamb-ganguli Tables 1–2)",
    "receptive-field": "effective receptive fields (kamb-ganguli Fig. 4)",
    "information": "information spreading along the reverse process (EFT paper)",
    "criticality": "correlation length, mode softening and critical times (ambrogioni)",
    "guidance-pulses": "guidance pulses around the critical time (ambrogioni)",
    "compare-processes": "forward processes compared (RG slides)",
    "classifier": "a classifier trained for the guidance analysis",
}


def _open(run_dir: str | Path) -> tuple[RunDir, dict[str, Any]]:
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory (give a run directory holding config.json)")
    try:
        run = RunDir.open(path)
        config = read_json_file(run.file("config.json"), ReportError)
    except RunError as exc:
        raise ReportError(str(exc)) from None
    if not isinstance(config, dict):
        raise ReportError(f"{run.file('config.json')} holds no JSON object (is it a run directory?)")
    return run, config


def _optional_json(run: RunDir, name: str) -> dict[str, Any]:
    if not run.exists(name):
        return {}
    value = read_json_file(run.file(name), ReportError)
    return value if isinstance(value, dict) else {"value": value}


def _overview(run: RunDir, kind: str, env: dict[str, Any]) -> str:
    rows = [{"key": "kind", "value": f"{kind}: {KINDS.get(kind, 'no kind-specific section; generic report')}"},
            {"key": "directory", "value": str(run.path.resolve())}]
    for key in ("time", "scorefield", "git_commit", "torch", "device", "platform"):
        if key in env:
            rows.append({"key": key, "value": str(env[key])})
    if env.get("argv"):
        rows.append({"key": "command", "value": " ".join(map(str, env["argv"]))})
    return html.table(rows, ["key", "value"])


def _tables(run: RunDir) -> str:
    found = contents.tables(run)
    if not found:
        return "<p class='note'>This run saved no tables.</p>"
    return "".join(f"<h3>{html.esc(t.name)}.csv</h3>{html.table(t.rows, t.columns, t.title)}" for t in found)


def _figures(run: RunDir) -> tuple[str, int]:
    found = contents.figures(run)
    if not found:
        return "<p class='note'>This run saved no figures.</p>", 0
    out = []
    for f in found:
        data = f"; its data: {', '.join(html.esc(d) for d in f.data)}" if f.data else ""
        out.append(html.figure(data_uri(f.png), f"<b>{html.esc(f.name)}</b>{data}", f.name))
    return "".join(out), len(found)


def _engine(engine: dict[str, Any]) -> str:
    routes = [{"route (cross term/fold/device)": k, "calls": v} for k, v in (engine.get("by_route") or {}).items()]
    bounds = {k: v for k, v in engine.items() if k != "by_route"}
    return (html.key_values(bounds) + html.table(routes) +
            "<p class='note'>Every engine call is in engine.jsonl: route, implementation, device, patch size, ᾱ "
            "range and the certified bounds on the neglected posterior mass and the logit error.</p>")


def _metrics(run: RunDir) -> str | None:
    try:
        rows = run.read_metrics()
    except RunError as exc:
        raise ReportError(str(exc)) from None
    if not rows:
        return None
    note = (f"<p class='note'>last {METRIC_ROWS} of {len(rows)} lines of metrics.jsonl</p>"
            if len(rows) > METRIC_ROWS else f"<p class='note'>{len(rows)} lines of metrics.jsonl</p>")
    return note + html.table(rows[-METRIC_ROWS:])


def _files(run: RunDir) -> str:
    rows = [{"file": str(p.relative_to(run.path)), "bytes": p.stat().st_size}
            for p in sorted(run.path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    listing = html.table(rows, ["file", "bytes"], max_rows=2000)
    return f"<details><summary>{len(rows)} files</summary>{listing}</details>"


def build_report(run_dir: str | Path, max_samples: int = MAX_SAMPLES) -> str:
    """The report of a run directory as one HTML document (a string); see `write_report`."""
    if not isinstance(max_samples, int) or max_samples < 1:
        raise ReportError(f"max_samples (--max-samples) must be a positive integer, got {max_samples!r}")
    run, config = _open(run_dir)
    kind = str(config.get("kind", "unknown"))
    summary = _optional_json(run, "summary.json")
    env = _optional_json(run, "environment.json")
    parts: list[tuple[str, str, str]] = [("run", "Run", _overview(run, kind, env))]
    if summary:
        parts.append(("summary", "Summary (summary.json)", html.key_values(
            {k: v for k, v in summary.items() if k != "engine"})))
    if kind == "predict":
        parts.append(("prediction", "Network, theories and IS, sample by sample",
                      sections.prediction(run, config, max_samples)))
    if run.exists("mosaic.npz"):
        parts.append(("provenance", "Patch mosaic: provenance on hover", sections.provenance(run, max_samples)))
    figures, _ = _figures(run)
    parts += [("figures", "Figures", figures), ("tables", "Tables", _tables(run))]
    engine = contents.engine_summary(run, summary)
    if engine:
        parts.append(("engine", "Engine log", _engine(engine)))
    metrics = _metrics(run)
    if metrics:
        parts.append(("metrics", "Metrics", metrics))
    parts += [("config", "Configuration (config.json)", html.key_values(config) + "<details><summary>as JSON"
                                                                                   "</summary>" +
               html.json_block(config) + "</details>"),
              ("files", "Files", _files(run))]
    return html.page(f"scorefield {kind} run: {run.path.name}", parts)


def write_report(run_dir: str | Path, max_samples: int = MAX_SAMPLES) -> Path:
    """Write RUN/report.html (replacing an earlier report: it is derived from the run, never a result) and
    return its path. max_samples: how many samples the prediction grids and mosaics show. Raises ReportError
    (one line naming the file) for a folder that is not a run directory or a run file that cannot be read."""
    document = build_report(run_dir, max_samples)
    target = Path(run_dir) / REPORT
    atomic_write_bytes(target, document.encode("utf-8"))
    return target


__all__ = ["ReportError", "build_report", "write_report", "REPORT", "KINDS"]
