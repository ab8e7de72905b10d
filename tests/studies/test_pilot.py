import json

import numpy as np
import pytest

from orca_lora import cli
from orca_lora.run_files import read_finished_runs
from orca_lora.studies.pilot import pilot_rows
from study_toys import BLOCKS, write_study_run


def write_pilot(root):
    """darcy at two learning rates, ranks 1 and 32 on seeds 0 and 1 (and rank 8): at 3e-3 rank 32 is 20% better
    and rank 8 at 6 epochs is within 5% of 18 epochs; at 1e-3 the ranks are level and no longer run exists."""
    rng = np.random.default_rng(0)
    levels = {3e-3: {1: 0.12, 8: 0.105, 32: 0.10}, 1e-3: {1: 0.11, 8: 0.11, 32: 0.11}}
    for lr, by_rank in levels.items():
        for rank, level in by_rank.items():
            for seed in ((0,) if rank == 8 else (0, 1)):
                for epochs in ((6, 18) if (rank, lr) == (8, 3e-3) else (6,)):
                    errors = level * (0.9 if epochs == 18 else 1.0) + 0.002 * rng.standard_normal(40)
                    run = write_study_run(root, f"lr{lr}_r{rank}_s{seed}_e{epochs}", rank=rank, seed=seed,
                                          epochs=epochs, val_errors=errors, test_errors=errors,
                                          block_gaps=np.ones(len(BLOCKS)), extra_overrides=[f"stage3.lr={lr}"])
                    metrics = json.loads(run.metrics.read_text())
                    metrics["stage_seconds"] = {"stage3": 10.0 * epochs}
                    run.metrics.write_text(json.dumps(metrics))
    return root


def test_rank_binds_where_g_is_above_zero_and_training_is_long_enough(tmp_path):
    runs = read_finished_runs([write_pilot(tmp_path)])
    rows = {row.setting["stage3.lr"]: row for row in pilot_rows(runs, n_resamples=199)}
    assert set(rows) == {1e-3, 3e-3}  # the 18-epoch run (rank 8 only) makes no row of its own
    binding, level = rows[3e-3], rows[1e-3]
    assert (binding.low_rank, binding.high_rank, binding.seeds) == (1, 32, [0, 1])
    low = [run for run in runs if run.settings["stage3.lr"] == 3e-3 and run.metrics.rank == 1]
    high = [run for run in runs if run.settings["stage3.lr"] == 3e-3 and run.metrics.rank == 32]
    e_low = np.mean([run.metrics.best_val_error for run in low])
    e_high = np.mean([run.metrics.best_val_error for run in high])
    assert binding.benefit == pytest.approx((e_low - e_high) / e_high)  # G from the validation means
    assert 0 < binding.benefit_interval[0] < binding.benefit < binding.benefit_interval[1]
    assert binding.check_ratio == pytest.approx(1 / 0.9, rel=0.02)  # e(6 epochs) / e(18 epochs), rank 8
    assert binding.rank_binds and binding.stage3_seconds == pytest.approx(60.0)
    assert level.benefit_interval[0] < 0 < level.benefit_interval[1] and level.check_ratio is None
    assert not level.rank_binds


def test_the_pilot_command_prints_and_writes_its_table(tmp_path, capsys):
    write_pilot(tmp_path)
    assert cli.main(["pilot", str(tmp_path)]) == 0
    table = (tmp_path / "pilot.md").read_text()
    assert table in capsys.readouterr().out
    assert "| darcy | 6 | 0.003 | " in table and table.count("| yes |") == 1 and "n/a (no longer run)" in table


def test_a_directory_without_two_ranks_names_the_pilot_sweep(tmp_path, capsys):
    write_study_run(tmp_path, "one", rank=8, val_errors=np.full(5, 0.1), test_errors=np.full(5, 0.1),
                    block_gaps=np.ones(len(BLOCKS)))
    assert cli.main(["pilot", str(tmp_path)]) == 2
    assert "LoRA runs at two ranks on one seed: run the pilot sweep (configs/pilot_regime.yaml)" in \
        capsys.readouterr().err
    assert not (tmp_path / "pilot.md").exists()


def test_settings_outside_the_setting_keys_make_rows_of_their_own(tmp_path):
    """Two source bodies at one training setting: two rows, each naming its body, never pooled."""
    for classes, level in ((16, 0.10), (64, 0.05)):
        for rank in (1, 32):
            errors = np.full(20, level * (1.2 if rank == 1 else 1.0))
            write_study_run(tmp_path, f"c{classes}_r{rank}", rank=rank, val_errors=errors, test_errors=errors,
                            block_gaps=np.ones(len(BLOCKS)), extra_overrides=[f"source.pretrain.n_classes={classes}"])
    rows = pilot_rows(read_finished_runs([tmp_path]), n_resamples=99)
    assert [row.other for row in rows] == [{"source.pretrain.n_classes": 16}, {"source.pretrain.n_classes": 64}]
    assert [row.high_error for row in rows] == pytest.approx([0.10, 0.05])
    assert all(row.setting == rows[0].setting for row in rows)
