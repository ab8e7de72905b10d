import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest

from orca_lora.cli import main
from orca_lora.experiments import tables
from orca_lora.experiments.tables import RunRecord, summarize, table_csv, table_markdown


def record(task="darcy", method="lora", allocation="uniform", rank=4, seed=0, error=0.1, params=1000):
    return RunRecord(Path("r"), task, method, allocation, rank, seed, error, error, 0.3, params, None, None)


def test_summary_is_mean_and_sample_std_over_seeds():
    errors = [0.10, 0.12, 0.17]
    records = [record(seed=s, error=e) for s, e in enumerate(errors)] + [record(rank=8, error=0.09, params=2000)]
    rows = summarize(records)
    assert [(row.rank, row.n_seeds) for row in rows] == [(4, 3), (8, 1)]
    assert rows[0].error_mean == pytest.approx(statistics.fmean(errors))
    assert rows[0].error_std == pytest.approx(statistics.stdev(errors))
    assert rows[0].trainable_params_m == pytest.approx(0.001) and math.isnan(rows[1].error_std)


def test_csv_and_markdown_carry_the_seed_table_columns():
    rows = summarize([record(seed=0, error=0.1), record(seed=1, error=0.2),
                      record(method="full", allocation="-", rank=None, error=0.05, params=2_500_000)])
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert list(parsed[0]) == list(tables.COLUMNS)
    assert parsed[0]["method"] == "full" and parsed[0]["rank"] == "" and parsed[0]["trainable_params_M"] == "2.5000"
    assert float(parsed[1]["prediction_error_mean"]) == pytest.approx(0.15)
    markdown = table_markdown(rows).splitlines()
    assert markdown[0] == "| task | method | ranks | rank | trainable params (M) | prediction error (↓) |"
    assert markdown[2] == "| darcy | full | - |  | 2.5000 | 0.0500 (1 seed) |"
    assert markdown[3] == "| darcy | lora | uniform | 4 | 0.0010 | 0.1500 ± 0.0707 (2 seeds) |"


def test_tasks_sharing_a_name_are_told_apart_by_their_settings():
    tasks = [{"name": "procedural", "class_offset": 100, "n_classes": 10},
             {"name": "procedural", "class_offset": 200, "n_classes": 10}, {"name": "darcy", "class_offset": 100}]
    assert tables._task_labels(tasks) == ["procedural(class_offset=100)", "procedural(class_offset=200)", "darcy"]


def test_find_runs_names_the_fix_when_nothing_finished(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run .*orca-lora sweep"):
        tables.find_runs([tmp_path])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tables.find_runs([tmp_path / "nowhere"])


@pytest.mark.slow
def test_table_command_reads_the_runs_of_a_sweep(tiny_sweep, capsys):
    records = tables.read_runs(tables.find_runs([tiny_sweep]))
    assert len(records) == 5 and {r.task for r in records} == {"darcy", "procedural"}
    for r in records:
        metrics = json.loads((r.directory / "metrics.json").read_text())
        assert r.test_error == metrics["test_error"] and r.trainable_params == metrics["trainable_params"]
        assert len(r.gaps) == len(r.block_ranks) == 4
    assert main(["table", str(tiny_sweep)]) == 0
    out = capsys.readouterr().out
    assert "| darcy | lora | ibp | 2 |" in out and "| procedural | lora | uniform | 1 |" in out
    assert len(list(csv.DictReader(open(tiny_sweep / "table.csv")))) == 5
