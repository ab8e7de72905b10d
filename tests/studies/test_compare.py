"""`orca-lora compare` on run directories fabricated with the run_files writers (no training)."""
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from orca_lora.cli import main
from orca_lora.config import to_yaml
from orca_lora.config_load import load_config
from orca_lora.records import GapResult, GapRow, RunMetrics, SampleErrors
from orca_lora.run_files import RunFiles, write_gaps, write_metrics, write_ranks, write_sample_errors
from orca_lora.studies.compare import compare_directory, read_compare_runs
from orca_lora.studies.stats.paired import holm, paired_sample_test

BLOCKS = ["layers.0.blocks.0", "layers.1.blocks.0"]
MODULES = [f"body.{block}.attn.qkv" for block in BLOCKS]
DEFAULTS = to_yaml(load_config())


def write_run(root: Path, allocation: str, lr: float, seed: int, val: float, test: np.ndarray,
              ranks: tuple[int, int] = (4, 4), task: str = "darcy", method: str = "lora", **settings) -> RunFiles:
    """A finished run: config, metrics, stage-2 gaps and ranks, per-sample errors (test error = their mean)."""
    run = RunFiles(root / f"{task}_{allocation}_lr{lr}_seed{seed}")
    run.root.mkdir(parents=True)
    config = OmegaConf.create(DEFAULTS)
    config.seed, config.task.name, config.stage3.lr, config.stage3.rank = seed, task, lr, 4
    config.stage2.allocation, config.stage3.method = allocation, method
    config.stage2.match_uniform_budget = allocation != "uniform"
    for key, value in settings.items():
        OmegaConf.update(config, key, value)
    run.config.write_text(OmegaConf.to_yaml(config))
    params = sum(rank * 80 for rank in ranks)
    write_metrics(run, RunMetrics(task=task, method=method, rank=4, gap_aware=allocation != "uniform", seed=seed,
                                  test_error=float(np.mean(test)), baseline_error=1.0, best_val_error=val,
                                  trainable_params=params + 1000, ranks=dict(zip(MODULES, ranks)), mean_gap=0.1,
                                  alignment={}, stage_seconds={}, device="cpu", torch="x", allocation=allocation))
    write_ranks(run, GapResult(BLOCKS, [0.1, 0.3], dict(zip(MODULES, ranks)), None, params, None, allocation))
    write_gaps(run, [GapRow(index, block, 16, gap, 0.05, 0.01, gap - 0.02, gap + 0.02, gap - 0.05, rank)
                     for index, (block, gap, rank) in enumerate(zip(BLOCKS, [0.1, 0.3], ranks))])
    write_sample_errors(run, SampleErrors(val=np.full(5, val), test=np.asarray(test, float)))
    return run


def test_the_learning_rate_is_chosen_on_validation_even_where_test_disagrees(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "uniform", 1e-3, seed, val=0.10, test=np.full(8, 0.50))  # best on validation
        write_run(tmp_path, "uniform", 1e-2, seed, val=0.20, test=np.full(8, 0.05))  # best on test
    [row] = compare_directory(tmp_path).rows
    assert row.lr == 1e-3 and row.test_error == pytest.approx(0.50) and row.val_error == pytest.approx(0.10)
    assert row.n_seeds == 2 and row.test_se == pytest.approx(0.0) and row.difference is None


def test_holm_against_a_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for the last
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan])  # a row without a test neither counts nor gets a p-value
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])


def fabricate_table(tmp_path: Path) -> dict[str, dict[int, np.ndarray]]:
    """Uniform, gap and shuffled on darcy at rank 4 (2 lrs, 3 seeds): per allocation, seed -> test errors."""
    rng = np.random.default_rng(0)
    chosen: dict[str, dict[int, np.ndarray]] = {}
    for allocation, shift in (("uniform", 0.0), ("gap", -0.02), ("shuffled", 0.01)):
        chosen[allocation] = {}
        for seed in (0, 1, 2):
            test = 0.3 + shift + rng.normal(0, 0.02, 12)
            chosen[allocation][seed] = test
            write_run(tmp_path, allocation, 1e-3, seed, 0.2 + shift, test, ranks=(2, 6) if allocation != "uniform"
                      else (4, 4))
            write_run(tmp_path, allocation, 1e-2, seed, 0.9, test + 1.0)
    return chosen


def test_paired_test_and_seed_spread_against_scipy_and_holm(tmp_path):
    chosen = fabricate_table(tmp_path)
    result = compare_directory(tmp_path)
    rows = {row.allocation: row for row in result.rows}
    assert [row.allocation for row in result.rows] == ["uniform", "gap", "shuffled"]
    reference = np.mean(list(chosen["uniform"].values()), axis=0)
    for allocation in ("gap", "shuffled"):
        errors = np.mean(list(chosen[allocation].values()), axis=0)
        row = rows[allocation]
        assert row.lr == 1e-3 and row.n_test == 12
        assert row.p_value == pytest.approx(stats.ttest_rel(errors, reference).pvalue)
        assert row.difference == pytest.approx(float(np.mean(errors - reference)))
        seeds = [np.mean(chosen[allocation][s]) - np.mean(chosen["uniform"][s]) for s in (0, 1, 2)]
        assert row.seed_difference == pytest.approx(np.mean(seeds))
        assert row.seed_difference_se == pytest.approx(np.std(seeds, ddof=1) / math.sqrt(3))
    assert [rows[a].p_holm for a in ("gap", "shuffled")] == pytest.approx(holm([rows["gap"].p_value,
                                                                               rows["shuffled"].p_value]))
    wilcoxon = compare_directory(tmp_path, "wilcoxon").rows[1]
    gap_errors = np.mean(list(chosen["gap"].values()), axis=0)
    assert wilcoxon.p_value == pytest.approx(stats.wilcoxon(gap_errors, reference).pvalue)


def test_identical_errors_give_p_one():
    assert paired_sample_test(np.ones(4), np.ones(4)).p_value == 1.0


@pytest.mark.parametrize("allocation, setting", [("uniform", "trainer.max_epochs"), ("gap", "stage3.alpha")])
def test_a_group_mixing_a_setting_is_refused_naming_it(tmp_path, allocation, setting):
    for seed in (0, 1):
        write_run(tmp_path, "uniform", 1e-3, seed, 0.1, np.full(4, 0.2))
    # inside the uniform group (a second seed), or across allocations of the table (the gap runs)
    write_run(tmp_path, allocation, 1e-3, 2, 0.1, np.full(4, 0.2), **{setting: 7})
    with pytest.raises(ValueError, match=rf"setting {setting} differs .*{allocation}_lr0.001_seed2"):
        compare_directory(tmp_path)


def test_allocation_options_may_differ_between_allocations(tmp_path):
    write_run(tmp_path, "uniform", 1e-3, 0, 0.1, np.full(4, 0.2))
    write_run(tmp_path, "gap", 1e-3, 0, 0.1, np.full(4, 0.2), **{"stage2.link": "log1p"})
    assert [row.allocation for row in compare_directory(tmp_path).rows] == ["uniform", "gap"]


def test_different_test_sets_are_refused_naming_the_runs(tmp_path):
    write_run(tmp_path, "uniform", 1e-3, 0, 0.1, np.full(4, 0.2))
    write_run(tmp_path, "gap", 1e-3, 0, 0.1, np.full(5, 0.2))
    with pytest.raises(ValueError, match=r"gap runs \(.*darcy_gap_lr0.001_seed0.*\) have 5 test samples.* 4"):
        compare_directory(tmp_path)


def test_runs_of_other_methods_are_not_compared(tmp_path):
    write_run(tmp_path, "uniform", 1e-3, 0, 0.1, np.full(4, 0.2))
    write_run(tmp_path, "flat", 1e-3, 0, 0.1, np.full(4, 0.2), method="ibp-lora")  # what ibp-posterior reads
    assert [run.allocation for run in read_compare_runs([tmp_path])] == ["uniform"]


def test_a_run_without_a_budget_is_refused(tmp_path):
    write_run(tmp_path, "gap", 1e-3, 0, 0.1, np.full(4, 0.2), **{"stage2.match_uniform_budget": False})
    with pytest.raises(ValueError, match="was not given a budget.*stage2.match_uniform_budget=true"):
        read_compare_runs([tmp_path])


def test_stage3_ranks_win_over_stage2_ranks(tmp_path):
    run = write_run(tmp_path, "uniform", 1e-3, 0, 0.1, np.full(4, 0.2))
    stage3 = GapResult(BLOCKS, None, dict(zip(MODULES, (1, 1))), None, 160, None, "uniform")
    write_ranks(RunFiles(run.root), stage3)
    (run.root / "stage2" / "ranks.json").rename(run.training_ranks)
    write_ranks(run, GapResult(BLOCKS, None, dict(zip(MODULES, (4, 4))), None, 640, None, "uniform"))
    assert read_compare_runs([tmp_path])[0].adapter_params == 160


def test_the_command_writes_table_and_figures(tmp_path, capsys):
    fabricate_table(tmp_path)
    assert main(["compare", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| darcy | rank 4 | gap | 0.001 | 3 |" in printed
    for name in ("compare.csv", "compare.md", "plots/compare_error_vs_budget.png", "plots/compare_ranks.pdf"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "compare.csv").read_text().splitlines()[0].startswith("task,budget,allocation,lr")


def test_each_seed_may_read_its_own_posterior_run(tmp_path):
    write_run(tmp_path, "uniform", 1e-3, 0, 0.1, np.full(4, 0.2))
    for seed in (0, 1):
        write_run(tmp_path, "ibp-posterior", 1e-3, seed, 0.1, np.full(4, 0.2),
                  **{"stage2.posterior_run": str(tmp_path / f"ibp_seed{seed}")})
    assert [row.n_seeds for row in compare_directory(tmp_path).rows] == [1, 2]


def test_the_table_says_what_eva_brings_only_when_eva_is_in_it(tmp_path):
    from orca_lora.reports.compare_tables import compare_markdown
    write_run(tmp_path, "uniform", 1e-3, 0, 0.1, np.full(4, 0.2))
    assert "EVA's ranks and its initialisation" not in compare_markdown(compare_directory(tmp_path))
    write_run(tmp_path, "eva", 1e-3, 0, 0.1, np.full(4, 0.2))
    assert "eva: EVA's ranks and its initialisation" in compare_markdown(compare_directory(tmp_path))
