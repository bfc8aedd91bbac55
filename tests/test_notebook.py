"""notebooks/quickstart.ipynb runs top to bottom (its quick configuration) and is stored without outputs."""
from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_headless_in_quick_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLE_MM_NOTEBOOK_QUICK", "1")
    # The kernel is a new process: it must import this checkout's paddle_mm.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A failing cell raises CellExecutionError, naming the cell and the error.
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the curves and the test images
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "VQA accuracy" in text and "captions:" in text
    assert os.path.isfile(tmp_path / "runs" / "quickstart" / "curves.png")
