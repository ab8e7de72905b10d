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
