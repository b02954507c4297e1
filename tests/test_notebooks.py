"""The example notebooks: stored without outputs (always checked), and each one executed top to bottom with
nbclient (marked `notebooks`, skipped by default: `pytest -m notebooks`, needs the `notebooks` extra)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
TOPICS = ("local-score-machines", "information-spreading", "criticality", "forward-processes")


def test_there_is_one_notebook_per_paper_topic():
    for topic in TOPICS:
        assert any(topic in p.name for p in NOTEBOOKS), f"no notebook on {topic} in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    assert notebook.get("nbformat") == 4
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
        assert "attachments" not in cell, f"{path.name} cell {i} has attachments"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebooks]' to run the notebooks")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebooks]' to run the notebooks")
    pytest.importorskip("ipykernel", reason="pip install -e '.[notebooks]' to run the notebooks")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()                         # raises CellExecutionError naming the cell and its traceback
    shown = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert shown, f"{path.name} showed no figure"
