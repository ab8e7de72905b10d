"""run_files: the one rule for which block holds a module, the one reader of finished runs, and strict JSON
records."""
import json
import math
from pathlib import Path

import pytest

from orca_lora.records import RunMetrics
from orca_lora.run_files import RunFiles, module_block, read_finished_runs, read_metrics, task_labels, write_metrics

REPO = Path(__file__).resolve().parents[1]

BLOCKS = ("layers.0.blocks.0", "layers.0.blocks.1", "layers.0.blocks.10")


@pytest.mark.parametrize("module, expected", [
    ("body.layers.0.blocks.1.attn.qkv", 1),  # ranks.json / metrics.json names (the model's `body.` prefix)
    ("layers.0.blocks.1.mlp.fc1", 1),  # names without the prefix
    ("body.layers.0.blocks.10.mlp.fc2", 2),  # not block 1, whose name is a prefix of block 10's
    ("body.layers.1.blocks.0.attn.proj", None),
    ("body.xlayers.0.blocks.0.attn.qkv", None),  # a whole component, not a substring
    ("embedder.proj", 0),  # the embedding's projection makes block 0's input (stage 2 ranks it there)
])
def test_module_block_reads_whole_dotted_components(module, expected):
    assert module_block(module, BLOCKS) == expected


def write_run(directory, test_error: float, method: str = "lora", task: str = "darcy") -> RunFiles:
    run = RunFiles(directory)
    run.root.mkdir(parents=True)
    run.config.write_text(f"seed: 0\ntask:\n  name: {task}\n  n_train: {100 if method == 'lora' else 50}\n"
                          "output:\n  root: somewhere\n")
    write_metrics(run, RunMetrics(task=task, method=method, rank=2, gap_aware=False, seed=0, test_error=test_error,
                                  baseline_error=0.3, best_val_error=0.1, trainable_params=10, ranks={},
                                  mean_gap=None, alignment={}, stage_seconds={}, device="cpu", torch="x"))
    return run


def test_read_finished_runs_filters_methods_leaves_out_diverged_runs_and_labels_tasks(tmp_path, caplog):
    write_run(tmp_path / "a", 0.2)
    write_run(tmp_path / "b", 0.3, method="full")
    write_run(tmp_path / "c", math.nan)
    caplog.set_level("INFO", logger="orca_lora")
    runs = read_finished_runs([tmp_path])
    assert [run.files.root.name for run in runs] == ["a", "b"]
    assert [run.task for run in runs] == ["darcy(n_train=100)", "darcy(n_train=50)"]
    assert runs[0].settings["task.n_train"] == 100 and "output.root" not in runs[0].settings
    assert "c/metrics.json: test error nan" in caplog.text and "diverged" in caplog.text
    assert [run.files.root.name for run in read_finished_runs([tmp_path], method="full")] == ["b"]
    with pytest.raises(ValueError, match="no dora run under .*nothing to tabulate"):
        read_finished_runs([tmp_path], method="dora")
    (tmp_path / "a" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="a/config.yaml is missing"):
        read_finished_runs([tmp_path])


def test_task_labels_add_only_the_settings_that_differ():
    tasks = [{"name": "darcy", "n_train": 100, "sigma": 0.1}, {"name": "darcy", "n_train": 50, "sigma": 0.1},
             {"name": "heat", "n_train": 100, "sigma": 0.1}]
    assert task_labels(tasks) == ["darcy(n_train=100)", "darcy(n_train=50)", "heat"]


def refuse(constant):
    raise ValueError(f"{constant} is not JSON")


def test_records_are_strict_json_and_an_undefined_number_reads_back_as_nan(tmp_path):
    run = write_run(tmp_path / "a", math.nan)
    written = json.loads(run.metrics.read_text(), parse_constant=refuse)
    assert written["test_error"] is None and written["best_val_error"] == 0.1
    assert math.isnan(read_metrics(run).test_error) and read_metrics(run).mean_gap is None


def test_the_embedder_projection_lies_in_no_block_of_an_empty_list():
    assert module_block("embedder.proj", ()) is None
