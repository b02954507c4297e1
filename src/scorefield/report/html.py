"""HTML building blocks of a run report: escaped text, tables, embedded images, the page around them.

Everything is inline (styles, script, images as data URIs): the page is one file that opens anywhere, offline.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

MAX_TABLE_ROWS = 500

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
h3 { font-size: 1.0em; margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.4em 0 1em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
.scroll { max-height: 28em; overflow: auto; display: inline-block; }
.wide { overflow-x: auto; }
figure { margin: 0.6em 0 1.2em; } figcaption { font-size: 0.85em; color: #555; }
figure img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.6em; font-size: 0.8em; overflow: auto; max-height: 30em; }
.note { font-size: 0.85em; color: #555; }
.grid td { border: none; padding: 1px 3px; text-align: center; vertical-align: top; font-size: 0.75em; }
.grid th { background: none; border: none; font-weight: normal; font-size: 0.75em; text-align: center; }
.grid th.row { text-align: right; font-weight: bold; }
img.px { image-rendering: pixelated; display: block; margin: auto; }
.score { white-space: nowrap; color: #333; }
.mosaic { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; font-size: 0.8em; width: 17em; }
.mosaic img { cursor: crosshair; }
.provenance { min-height: 1.3em; font-family: monospace; }
"""

# Hover read-out of a patch mosaic: each mosaic image carries its provenance maps (data-source-*) as JSON rows
SCRIPT = """
document.querySelectorAll("img.provenance-map").forEach(function (img) {
  var image = JSON.parse(img.dataset.sourceImage), ys = JSON.parse(img.dataset.sourceY),
      xs = JSON.parse(img.dataset.sourceX), out = document.getElementById(img.dataset.readout);
  img.addEventListener("mousemove", function (event) {
    var box = img.getBoundingClientRect(), h = image.length, w = image[0].length;
    var y = Math.min(h - 1, Math.max(0, Math.floor((event.clientY - box.top) / box.height * h)));
    var x = Math.min(w - 1, Math.max(0, Math.floor((event.clientX - box.left) / box.width * w)));
    out.textContent = "pixel (" + y + ", " + x + ") \\u2190 training image #" + image[y][x] +
      ", patch centred at (" + ys[y][x] + ", " + xs[y][x] + ")";
  });
  img.addEventListener("mouseleave", function () { out.textContent = "hover a pixel"; });
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, everything else as text."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td>{esc(fmt(value))}</td>" if numeric else f"<td class='text'>{esc(fmt(value))}</td>"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str | None = None,
          max_rows: int = MAX_TABLE_ROWS) -> str:
    """Rows of dicts as an HTML table (at most `max_rows` rows shown, the count said)."""
    columns = list(columns or ([c for r in rows for c in r] if rows else []))
    columns = list(dict.fromkeys(columns))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows[:max_rows])
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    more = (f"<p class='note'>first {max_rows} of {len(rows)} rows shown (all rows are in the file)</p>"
            if len(rows) > max_rows else "")
    return f"<div class='scroll'><table>{cap}<tr>{head}</tr>{body}</table></div>{more}"


def key_values(mapping: Mapping[str, Any]) -> str:
    """A flat two-column table of a (nested) mapping: nested keys joined with dots, lists shown as JSON."""
    rows = [{"key": k, "value": v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)}
            for k, v in flatten(mapping).items()]
    return table(rows, ["key", "value"])


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def json_block(obj: Any) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=2, ensure_ascii=False))}</pre>"


def figure(src: str, caption: str, alt: str) -> str:
    return f"<figure><img src='{src}' alt='{esc(alt)}'><figcaption>{caption}</figcaption></figure>"


def page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: sections are (anchor, heading, body html); a table of contents links them."""
    toc = " · ".join(f"<a href='#{esc(a)}'>{esc(h)}</a>" for a, h, _ in sections)
    body = "".join(f"<section id='{esc(a)}'><h2>{esc(h)}</h2>{b}</section>" for a, h, b in sections)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<nav>{toc}</nav>{body}<script>{SCRIPT}</script></body></html>\n")
