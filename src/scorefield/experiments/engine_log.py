"""What ran: every engine call of a run, recorded in the run directory's engine.jsonl.

Each analytic machine keeps a log of its engine calls (`Denoiser.engine_log`): the route ('gemm', 'box',
'image', or 'closed-form'), the implementation that folded ('compiled', 'reference', 'autograd'), the device,
the patch size and ᾱ, the pairs folded, and the certified bounds — the largest bound on the neglected fraction
of the posterior mass (flat shortcut, skipped clusters, skipped box groups) and, on the box route, the largest
logit error the fixed-point grid can cause. `record` drains a model's log into engine.jsonl with the context
of the call (step, batch, denoiser); `summarize` gives the counts and the worst bounds for summary.json."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ..models import Denoiser
from ..runs import RunDir, jsonable

LOG = "engine.jsonl"


def record(run: RunDir, model: Any, **context: Any) -> int:
    """Append `model`'s engine calls since the last drain to engine.jsonl, each with `context`; returns how
    many (models without an engine, e.g. networks, record nothing)."""
    entries = model.engine_log() if isinstance(model, Denoiser) else []
    if not entries:
        return 0
    lines = "".join(json.dumps(jsonable({**context, **_compact(e)})) + "\n" for e in entries)
    with open(run.file(LOG), "a") as fh:
        fh.write(lines)
    return len(entries)


def _compact(entry: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    ab = out.pop("alpha_bar", None)
    if isinstance(ab, list) and ab:
        out["alpha_bar_min"], out["alpha_bar_max"] = min(ab), max(ab)
    return out


def read(run: RunDir) -> list[dict[str, Any]]:
    """The recorded engine calls (a torn last line, from an interruption, is skipped)."""
    path = run.file(LOG)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(run: RunDir) -> dict[str, Any]:
    """{calls, by_route: {"gemm/compiled/cpu": n, ...}, max_neglected_bound, max_logit_error_bound}."""
    rows = read(run)
    routes = Counter(f"{r.get('cross_term', '?')}/{r.get('fold', '?')}/{r.get('device', '?')}" for r in rows)
    return {"calls": len(rows), "by_route": dict(sorted(routes.items())),
            "max_neglected_bound": max((float(r.get("neglected_bound", 0.0)) for r in rows), default=0.0),
            "max_logit_error_bound": max((float(r.get("logit_error_bound", 0.0)) for r in rows), default=0.0)}
