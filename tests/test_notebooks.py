from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from orca_lora.config_load import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs_and_shows_plots(shared_data_root, tiny_settings, tmp_path):
    """The notebook's own TINY settings are checked, and it runs on the suite's (so that it shares the
    session's offline body instead of pretraining a deeper one)."""
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    parameters = notebook.cells[1]
    assert parameters.source.startswith("# parameters")
    own = {}
    exec(parameters.source, own)
    assert {"DATA_ROOT", "OUTPUT_ROOT", "TINY"} <= set(own)
    load_config(REPO / "configs" / "quickstart.yaml", own["TINY"])
    parameters.source = (f"DATA_ROOT = {str(shared_data_root)!r}\nOUTPUT_ROOT = {str(tmp_path / 'runs')!r}\n"
                         f"TINY = {tiny_settings!r}\n")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 3
    assert (tmp_path / "runs" / "notebook_quickstart" / "metrics.json").is_file()


def test_hypothesis_notebook_walks_through_a_sweep(tiny_sweep, tiny_settings):
    """On the tiny sweep the session already ran (the sweep cell skips every point): two tasks without rank-0 runs,
    so the walk-through reaches its end with the verdict saying why there is none."""
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
    assert "run now: 0, finished earlier: 5" in text
    assert "No verdict: 0 task(s) with a complete rank sweep and rank-0 runs (2 more without" in text
    assert "study_rank_curves.png" in text and (tiny_sweep / "report.md").is_file()  # the curves, without r*
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert images
