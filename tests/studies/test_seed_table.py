import math

import pytest

from orca_lora.config import to_yaml
from orca_lora.config_load import load_config
from orca_lora.records import RunMetrics
from orca_lora.run_files import RunFiles, write_metrics
from orca_lora.studies.seed_table import read_runs


def write_run(directory, test_error: float) -> RunFiles:
    run = RunFiles(directory)
    run.root.mkdir(parents=True)
    run.config.write_text(to_yaml(load_config()))
    write_metrics(run, RunMetrics(task="darcy", method="lora", rank=2, gap_aware=False, seed=0,
                                  test_error=test_error, baseline_error=0.3, best_val_error=0.1,
                                  trainable_params=10, ranks={}, mean_gap=None, alignment={},
                                  stage_seconds={}, device="cpu", torch="x"))
    return run


def test_read_runs_leaves_out_and_names_diverged_runs(tmp_path, caplog):
    good = write_run(tmp_path / "good", 0.2)
    bad = write_run(tmp_path / "bad", math.nan)
    caplog.set_level("WARNING", logger="orca_lora")
    records = read_runs([good.root, bad.root])
    assert [record.directory for record in records] == [good.root]
    assert f"{bad.metrics}: test error nan" in caplog.text and "diverged" in caplog.text
    with pytest.raises(ValueError, match="diverged; nothing to tabulate"):
        read_runs([bad.root])
