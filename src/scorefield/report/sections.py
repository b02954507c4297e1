"""The report sections particular to a kind of run: the prediction grids (kamb-ganguli Fig. 1: network,
theories and the IS baseline from the same seed, each with its r² and Pearson r against the network) and the
patch-mosaic provenance read out on hover (kamb-ganguli Sec. 4, Fig. 3–4)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..runs import RunDir
from .contents import ReportError, arrays, read_csv
from .html import esc
from .png import data_uri, encode_png, to_unit_range

PAGE = 16          # samples per grid page
PIXELS = 64        # displayed width of one sample image, CSS pixels (16 columns fit the page)


def _img(image: np.ndarray, alt: str, extra: str = "", cls: str = "px", pixels: int = PIXELS) -> str:
    height, width = image.shape[:2]
    shown = round(pixels * height / max(width, 1))
    return (f"<img class='{cls}' src='{data_uri(encode_png(image))}' width='{pixels}' height='{shown}' "
            f"alt='{esc(alt)}'{extra}>")


def prediction_order(config: dict[str, Any]) -> list[str]:
    """network, each theory, and the baseline (IS) last: the rows of the grids."""
    theories = list(config.get("theories") or {})
    baseline = config.get("baseline", "is")
    return ["network", *[t for t in theories if t != baseline], *[t for t in theories if t == baseline]]


def prediction(run: RunDir, config: dict[str, Any], max_samples: int) -> str:
    """The side-by-side grids of a prediction run, r² and Pearson r of every theory image under it."""
    if not run.exists("per_sample.csv"):
        raise ReportError(f"missing file {run.file('per_sample.csv')}: the prediction run is unfinished "
                          f"(finish it with  scorefield predict --resume {run.path})")
    rows, _ = read_csv(run.file("per_sample.csv"))
    names = prediction_order(config)
    shown = {n: to_unit_range(arrays(run, f"samples/{n}.npz")["samples"][:max_samples]) for n in names}
    n = min(len(rows), *(len(v) for v in shown.values()))
    parts = [f"<p class='note'>Rows: the network, each theory, and the baseline '{esc(names[-1])}' from the same "
             f"seed. Under each theory image: r² (coefficient of determination) and Pearson r against the "
             f"network's sample (from per_sample.csv). Showing {n} of {len(rows)} samples.</p>"]
    for start in range(0, n, PAGE):
        cols = range(start, min(n, start + PAGE))
        head = "".join(f"<th>#{rows[i].get('sample', i)}<br>seed {esc(rows[i].get('seed', '?'))}</th>" for i in cols)
        body = ""
        for name in names:
            cells = ""
            for i in cols:
                score = ("" if name == "network" else
                         f"<div class='score'>r² {_num(rows[i].get(f'{name}_r2'))}</div>"
                         f"<div class='score'>r {_num(rows[i].get(f'{name}_pearson'))}</div>")
                cells += f"<td>{_img(shown[name][i], f'{name} sample {i}')}{score}</td>"
            body += f"<tr><th class='row'>{esc(name)}</th>{cells}</tr>"
        parts.append(f"<div class='wide'><table class='grid prediction-grid'><tr><th></th>{head}</tr>{body}"
                     f"</table></div>")
    parts.append("<p class='note'>Prediction runs do not save patch provenance. For a provenance map, sample the "
                 "theory machine with <code>scorefield sample</code> and run <code>scorefield mosaic</code> on that "
                 "run; its report reads the source of each pixel on hover.</p>")
    return "".join(parts)


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else esc(value if value is not None else "?")


def provenance(run: RunDir, max_samples: int) -> str:
    """Each mosaic sample with the source (training image, patch centre) of the pixel under the pointer."""
    z = arrays(run, "mosaic.npz")
    missing = [k for k in ("samples", "source_image", "source_y", "source_x") if k not in z]
    if missing:
        raise ReportError(f"{run.file('mosaic.npz')} lacks the array(s) {', '.join(missing)}")
    images = to_unit_range(z["samples"][:max_samples])
    ab = float(z["alpha_bar"]) if "alpha_bar" in z else float("nan")
    parts = [f"<p class='note'>Hover a pixel: the training image and patch centre (y, x) whose patch the machine's "
             f"posterior puts the most weight on at ᾱ = {ab:g} (mosaic.npz). Showing {len(images)} of "
             f"{len(z['samples'])} samples.</p>"]
    for i, image in enumerate(images):
        maps = "".join(f" data-{key.replace('_', '-')}='{esc(json.dumps(z[key][i].astype(int).tolist()))}'"
                       for key in ("source_image", "source_y", "source_x"))
        readout = f"provenance-{i}"
        img = _img(image, f"mosaic sample {i}", f"{maps} data-readout='{readout}'", "px provenance-map", 2 * PIXELS)
        parts.append(f"<div class='mosaic'>sample {i}{img}"
                     f"<div class='provenance' id='{readout}'>hover a pixel</div></div>")
    return "".join(parts)
