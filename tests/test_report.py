"""scorefield.report and `scorefield report`: the HTML of tiny runs (every figure and table, per-sample r² and
Pearson r, mosaic provenance), one-line errors, and — marked `browser` — the page in a real headless Chromium:
no console error, every image decoded, the provenance read-out answering a hover."""
from __future__ import annotations

import base64
import csv
import html
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import scorefield as sf
import scorefield.experiments.prediction as pr
import scorefield.report as report
from scorefield.analysis.mosaic import patch_mosaic
from scorefield.cli import main
from scorefield.experiments.sample_run import SampleConfig, run_sampling
from scorefield.runs import RunDir

TRUTH = [3, 3, 5, 5, 7, 7]          # the known network's patch sizes, lowest noise first


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A prediction run, a sampling run with its mosaic, and a run of a kind the report does not know."""
    root = tmp_path_factory.mktemp("runs")
    data = sf.data.load("digits", subset=40, seed=0)
    network = sf.models.make("bbels", data, patch_size=TRUTH, padding="zeros")
    pr.predict(network, data, theories=["is", "ls", "bbels"], schedule_from=TRUTH, seeds=range(3), steps=6,
               out=root, name="predict", progress=False)
    sampled = run_sampling(SampleConfig(model="ls", model_options={"patch_size": 3}, data="digits",
                                        data_options={"subset": 30}, n=3, steps=3), root=root, name="sample",
                           progress=False)
    patch_mosaic(sampled.path)
    odd = RunDir.create("mystery", {"size": 4, "nested": {"flag": True}}, root=root, name="mystery")
    odd.save_table("numbers", [{"a": 1, "b": 0.5}, {"a": 2, "b": 0.25}], title="two rows")
    (odd.path / "notes.md").write_text("### only markdown\n\n| x | y |\n|---|---|\n| 7 | text |\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    odd.save_figure("line", fig)
    odd.save_arrays("line", x=np.array([0, 1]))
    odd.log_metrics(step=1, value=0.5)
    return {"predict": root / "predict", "sample": sampled.path, "mystery": odd.path}


def _embedded(png: Path) -> str:
    return base64.b64encode(png.read_bytes()).decode("ascii")


def test_prediction_report_shows_every_figure_table_and_per_sample_score(runs):
    run = runs["predict"]
    page = report.write_report(run).read_text()
    pngs = sorted(run.glob("*.png"))
    assert {p.name for p in pngs} >= {"grid-00.png", "scatter.png"}
    for png in pngs:
        assert _embedded(png) in page, png.name
    assert page.count("<figure>") == len(pngs)
    assert "<h3>agreement.csv</h3>" in page and "<h3>per_sample.csv</h3>" in page
    assert html.escape("Agreement of each theory with the network") in page      # the table's title
    rows = list(csv.DictReader((run / "per_sample.csv").open()))
    for row in rows:
        for theory in ("is", "ls", "bbels"):
            assert f"r² {float(row[theory + '_r2']):.3f}" in page
            assert f"r {float(row[theory + '_pearson']):.3f}" in page
    grid = page[page.index("prediction-grid"):]
    order = [grid.index(f"<th class='row'>{name}</th>") for name in ("network", "ls", "bbels", "is")]
    assert order == sorted(order)                       # network, the theories, the IS baseline last
    assert grid.count("class='px'") == 4 * len(rows)
    assert "Engine log" in page and "gemm" in page and "Metrics" in page
    assert "do not save patch provenance" in page


def test_mosaic_report_carries_the_provenance_of_every_pixel(runs):
    run = runs["sample"]
    page = report.write_report(run).read_text()
    z = np.load(run / "mosaic.npz")
    assert page.count("provenance-map") == len(z["samples"]) + 1           # each image, and the script
    for i in range(len(z["samples"])):
        attribute = html.escape(json.dumps(z["source_image"][i].astype(int).tolist()), quote=True)
        assert f"data-source-image='{attribute}'" in page
    for name in ("mosaic.png", "nearest.png", "samples.png"):
        assert _embedded(run / name) in page
    assert "memorization.csv" in page and "its data: mosaic.npz" in page


def test_unknown_kinds_get_the_generic_report(runs):
    page = report.build_report(runs["mystery"])
    assert "mystery: no kind-specific section" in page
    assert "two rows" in page and "only markdown" in page and "<td class='text'>text</td>" in page
    assert _embedded(runs["mystery"] / "line.png") in page and "its data: line.npz" in page
    assert "nested.flag" in page and "1 lines of metrics.jsonl" in page


def test_bad_input_is_one_error_naming_the_file(runs, tmp_path, capsys):
    with pytest.raises(report.ReportError, match="not a directory"):
        report.write_report(tmp_path / "absent")
    with pytest.raises(report.ReportError, match="no config.json"):
        report.write_report(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="config.json is not valid JSON"):
        report.write_report(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(runs["predict"], broken)
    (broken / "per_sample.csv").unlink()
    with pytest.raises(report.ReportError, match="per_sample.csv: the prediction run is unfinished"):
        report.write_report(broken)
    (broken / "grid-00.png").write_bytes(b"not an image")
    shutil.copy(runs["predict"] / "per_sample.csv", broken)
    with pytest.raises(report.ReportError, match="grid-00.png is not a PNG"):
        report.write_report(broken)
    with pytest.raises(report.ReportError, match="max_samples"):
        report.write_report(runs["predict"], max_samples=0)
    assert main(["report", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scorefield report: error:") and "grid-00.png" in err and "\n" not in err


def test_cli_writes_report_html(runs, capsys):
    assert main(["report", str(runs["mystery"]), "--max-samples", "2"]) == 0
    assert str(runs["mystery"] / "report.html") in capsys.readouterr().out
    assert (runs["mystery"] / "report.html").read_text().startswith("<!DOCTYPE html>")


# ---- a real browser -------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    ending in a NUL byte on file descriptors 3 and 4), so no websocket library is needed."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def descriptors() -> None:             # in the child, before exec: the protocol's fixed descriptors
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "about:blank"], pass_fds=(3, 4), preexec_fn=descriptors,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._id, self.events = b"", 0, []

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._receive(deadline))

    def settle(self, seconds: float = 0.5) -> None:
        """Collect the events that arrive within `seconds` (late console messages)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._receive(deadline))
        except TimeoutError:
            pass

    def open(self, path: Path) -> str:
        """Load a file in a fresh tab with console, log and page events on; returns the session id."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session)
        self.events.clear()
        self.call("Page.navigate", session, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.settle()
        return session

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(f"{details.get('text', 'exception')} {details.get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"{params['entry'].get('text', 'log error')} {params['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, EOFError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)


IMAGES = "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
HOVER = """(() => { const img = document.querySelector('img.provenance-map'), box = img.getBoundingClientRect();
  img.dispatchEvent(new MouseEvent('mousemove', {clientX: box.left + 1, clientY: box.top + 1, bubbles: true}));
  return document.getElementById(img.dataset.readout).textContent; })()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = _chromium()
    if executable is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser test needs it")
    b = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.mark.browser
def test_the_browser_sees_the_errors_it_should(browser, tmp_path):
    """The check itself: a page with a script error and a missing image must fail it."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>"
                   "<img src='absent.png' alt='absent'><script>undefinedFunction();</script></body></html>")
    session = browser.open(bad)
    errors = browser.errors()
    assert any("undefinedFunction" in e for e in errors) and any("absent.png" in e for e in errors), errors
    assert browser.evaluate(session, IMAGES) == [["absent", True, 0]]


@pytest.mark.browser
@pytest.mark.parametrize("kind", ["predict", "sample", "mystery"])
def test_report_loads_in_a_browser_without_errors_and_shows_every_image(runs, browser, kind):
    page = report.write_report(runs[kind])
    session = browser.open(page)
    assert browser.errors() == []
    images = browser.evaluate(session, IMAGES)
    assert images and all(complete and width > 0 for _, complete, width in images), images
    figures = len([p for p in runs[kind].rglob("*.png") if "batches" not in p.parts])
    assert sum(1 for alt, _, _ in images if alt.endswith(".png")) == figures
    if kind == "sample":
        readout = browser.evaluate(session, HOVER)
        z = np.load(runs[kind] / "mosaic.npz")
        assert readout == (f"pixel (0, 0) ← training image #{int(z['source_image'][0, 0, 0])}, patch centred at "
                           f"({int(z['source_y'][0, 0, 0])}, {int(z['source_x'][0, 0, 0])})")
        assert browser.errors() == []
