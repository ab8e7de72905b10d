import logging

import matplotlib.image
import pytest

from orca_lora import cli
from orca_lora.choices import TASKS
from orca_lora.config import TaskConfig
from orca_lora.data.catalog import TASK_NOTES, catalog, format_catalog, write_task_grid

TINY = TaskConfig(n_train=12, n_test=10, resolution=16, n_classes=4, val_fraction=0.25)


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main gives the `orca_lora` logger a handler on the stderr that capsys replaces."""
    logger = logging.getLogger("orca_lora")
    state = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = state


def test_catalog_lists_every_task_and_says_why_cifar_is_missing(tmp_path):
    rows = {row.name: row for row in catalog(TINY, tmp_path)}
    assert set(rows) == set(TASKS) == set(TASK_NOTES)
    assert "missing" in rows["cifar10"].unavailable and rows["cifar10"].sizes is None
    assert rows["procedural-fourier"].input_shape == (6, 16, 16) and rows["procedural-fourier"].output_shape == ()
    assert rows["heat"].output_shape == (16, 16) and rows["heat"].metric == "relative L2"
    assert rows["digits"].sizes == (9, 3, 10)
    text = format_catalog(list(rows.values()))
    assert all(name in text for name in TASKS) and "misclassification (4 classes)" in text


def test_grid_has_a_row_per_classification_task_and_two_per_regression_task(tmp_path):
    path = write_task_grid(TINY, tmp_path / "data", tmp_path / "show", samples=3,
                           names=("digits", "poisson", "cifar10"))
    image = matplotlib.image.imread(path)
    assert path.name == "tasks.png"
    assert image.shape[0] == pytest.approx(3 * 1.45 * 110, abs=2)  # digits, poisson input, poisson target; no cifar
    assert image.std() > 0.05  # not blank


def test_tasks_command_prints_the_table_and_writes_the_grid(tmp_path, capsys):
    sets = [f"data_root={tmp_path / 'data'}", "task.n_train=12", "task.n_test=10", "task.resolution=16",
            "task.n_classes=4"]
    code = cli.main(["tasks", "--show", str(tmp_path / "show"), *[p for s in sets for p in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 0 and "spectrogram" in out and "relative L2" in out
    assert (tmp_path / "show" / "tasks.png").is_file()
