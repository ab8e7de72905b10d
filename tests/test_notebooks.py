from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs_and_shows_plots(shared_data_root, tmp_path):
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    parameters = notebook.cells[1]
    assert parameters.source.startswith("# parameters")
    parameters.source = parameters.source.replace('"../data"', repr(str(shared_data_root))).replace(
        '"../runs"', repr(str(tmp_path / "runs")))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 3
    assert (tmp_path / "runs" / "notebook_quickstart" / "metrics.json").is_file()


def test_hypothesis_notebook_walks_through_a_sweep(tiny_sweep, tiny_settings):
    """On the tiny sweep the session already ran (the sweep cell skips every point): two tasks, so the
    walk-through reaches its end with the verdict saying why there is none."""
    notebook = nbformat.read(REPO / "notebooks" / "hypothesis.ipynb", as_version=4)
    parameters = notebook.cells[1]
    assert parameters.source.startswith("# parameters")
    sweep_file = tiny_sweep.parent.parent / "tiny_sweep.yaml"
    parameters.source = (f"SWEEP_FILE = {str(sweep_file)!r}\n"
                         f"OVERRIDES = {tiny_settings + [f'output.root={tiny_sweep.parent}']!r}\nWORKERS = 1\n"
                         "RESAMPLES = 99\nPOWER_STUDIES = 0\n")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    text = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "run now: 0, finished earlier: 5" in text and "No verdict: 2 task(s)" in text
    assert "r* (validation)" in text and (tiny_sweep / "report.md").is_file()
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert images
