import json

import numpy as np
import pytest

from orca_lora.cli import main
from orca_lora.config import ConfigError, to_yaml
from orca_lora.config_load import load_config
from orca_lora.rank.calibrate import calibrate
from orca_lora.rank.law_file import check_provenance, read_law_file
from orca_lora.records import GapRow, RunMetrics
from orca_lora.run_files import RunFiles, write_gaps, write_metrics

BLOCKS = ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
MODULES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def write_ibp_run(directory, task, corrected, module_ranks, cap=16, overrides=(), seed=0):
    """A finished ibp-lora run's files: config, gaps (floor 0.5 everywhere), posterior ranks."""
    run = RunFiles(directory)
    run.root.mkdir(parents=True)
    config = load_config(None, [f"task.name={task}", f"seed={seed}", *overrides])
    run.config.write_text(to_yaml(config))
    (run.root / "stage2").mkdir()
    write_gaps(run, [GapRow(i, name, 48, gap + 0.5, 0.5, 0.005, gap, gap + 1, gap, 4)
                     for i, (name, gap) in enumerate(zip(BLOCKS, corrected))])
    posterior = {f"body.{block}.{module}": rank for block, ranks in zip(BLOCKS, module_ranks)
                 for module, rank in zip(MODULES, ranks)}
    write_metrics(run, RunMetrics(task=task, method="ibp-lora", rank=8, gap_aware=False, seed=seed, test_error=0.1,
                                  baseline_error=0.3, best_val_error=0.1, trainable_params=10, ranks={},
                                  mean_gap=None, alignment={}, stage_seconds={}, device="cpu", torch="x",
                                  allocation="flat", posterior_ranks=posterior,
                                  posterior_caps=dict.fromkeys(posterior, cap)))
    return run


def test_calibrate_takes_block_medians_censors_at_the_cap_and_writes_the_law(tmp_path):
    write_ibp_run(tmp_path / "a", "poisson", [0.0, 0.5, 1.5, 3.5], [[1, 1, 2, 9], [2, 2, 3, 3], [4, 5, 4, 6], [16, 16, 16, 2]])
    write_ibp_run(tmp_path / "b", "heat", [0.0, 1.0, 2.0, 6.0], [[1, 2, 1, 1], [3, 3, 2, 4], [5, 6, 6, 6], [9, 10, 9, 8]])
    write_ibp_run(tmp_path / "c", "digits", [0.5, 0.5, 3.0, 4.0], [[2, 2, 2, 2], [1, 2, 3, 2], [8, 7, 8, 9], [16, 16, 16, 16]])
    law_file = calibrate([tmp_path])
    poisson = {o.block: o for o in law_file.observations if o.task == "poisson"}
    assert [poisson[b].rank for b in BLOCKS] == [1, 2, 4, 16]  # median_low of each block's four modules
    assert poisson[BLOCKS[3]].censored and not poisson[BLOCKS[2]].censored
    assert [poisson[b].x for b in BLOCKS] == [1.0, 2.0, 4.0, 8.0]  # 1 + corrected / floor
    assert law_file.law.n_tasks == 3 and law_file.law.n_censored == 2 and law_file.law.beta > 0
    written = json.loads((tmp_path / "rank_law.json").read_text())
    assert written["provenance"]["distance"] == "mmd" and written["law"]["beta"] == pytest.approx(law_file.law.beta)
    assert read_law_file(tmp_path / "rank_law.json").law == law_file.law


def test_seeds_of_one_task_give_one_observation_per_block(tmp_path):
    ranks = [[1, 1, 1, 1], [2, 2, 2, 2], [4, 4, 4, 4], [8, 8, 8, 8]]
    write_ibp_run(tmp_path / "s0", "poisson", [0.0, 0.5, 1.5, 3.5], ranks, seed=0)
    write_ibp_run(tmp_path / "s1", "poisson", [0.0, 0.5, 1.5, 3.5], [[r + 2 for r in b] for b in ranks], seed=1)
    write_ibp_run(tmp_path / "h", "heat", [0.0, 1.0, 2.0, 6.0], ranks)
    law_file = calibrate([tmp_path])
    assert len(law_file.observations) == 8
    assert [o.rank for o in law_file.observations if o.task == "poisson"] == [1, 2, 4, 8]


def test_calibrate_refuses_mixed_settings_and_runs_without_posterior_ranks(tmp_path):
    write_ibp_run(tmp_path / "a", "poisson", [0.0, 0.5, 1.5, 3.5], [[1] * 4] * 4)
    write_ibp_run(tmp_path / "b", "heat", [0.0, 1.0, 2.0, 6.0], [[1] * 4] * 4, overrides=["stage2.max_samples=128"])
    with pytest.raises(ValueError, match="differs from the first run in max_samples"):
        calibrate([tmp_path])
    other = write_ibp_run(tmp_path / "lora" / "x", "heat", [0.0, 1.0, 2.0, 6.0], [[1] * 4] * 4)
    metrics = json.loads(other.metrics.read_text())
    metrics["posterior_ranks"] = None
    other.metrics.write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="no posterior ranks.*ibp-lora"):
        calibrate([tmp_path / "lora"])


def test_a_law_fitted_elsewhere_is_refused_and_the_cli_prints_the_fit(tmp_path, capsys):
    write_ibp_run(tmp_path / "a", "poisson", [0.0, 0.5, 1.5, 3.5], [[1] * 4, [2] * 4, [4] * 4, [7] * 4])
    write_ibp_run(tmp_path / "b", "heat", [0.0, 1.0, 2.0, 6.0], [[1] * 4, [3] * 4, [5] * 4, [11] * 4])
    assert main(["calibrate", str(tmp_path), "--output", str(tmp_path / "law.json")]) == 0
    out = capsys.readouterr().out
    assert "beta = " in out and "profile interval" in out and "leave-one-task-out" in out
    law_file = read_law_file(tmp_path / "law.json")
    check_provenance(load_config(None, ["stage2.allocation=law", f"stage2.law={tmp_path / 'law.json'}"]),
                     law_file, "law.json")
    with pytest.raises(ConfigError, match="fitted with stage2.distance = 'mmd', this config has 'otdd'"):
        check_provenance(load_config(None, ["stage2.distance=otdd"]), law_file, "law.json")
    with pytest.raises(ConfigError, match="set both stage2.allocation=law and stage2.law"):
        load_config(None, ["stage2.allocation=law"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["stage2.allocation=law", "stage2.law=nowhere.json"])
    assert np.isfinite(law_file.law.leave_one_task_out_error)
