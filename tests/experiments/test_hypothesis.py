import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from orca_lora.cli import main
from orca_lora.experiments import hypothesis as hyp
from orca_lora.experiments.tables import RunRecord

RANKS = [1, 2, 4, 8, 16, 32]


def planted_records(rank_stars, gaps, seeds=(0,), noise=0.0, rng_seed=0):
    """Uniform-rank sweeps whose error is flat from r*_t on and 20% higher per halving below it."""
    rng = np.random.default_rng(rng_seed)
    records = []
    for index, (rank_star, gap) in enumerate(zip(rank_stars, gaps)):
        for seed, rank in itertools.product(seeds, RANKS):
            error = 0.1 * (1 + 0.2 * max(0.0, math.log2(rank_star / rank))) * (1 - 0.001 * math.log2(rank))
            error *= 1 + noise * rng.standard_normal()
            records.append(RunRecord(Path(f"t{index}/r{rank}/s{seed}"), f"task{index}", "lora", "uniform", rank, seed,
                                     error, error, 0.5, 1000 * rank, [gap * 1.2, gap * 0.8], [rank, rank]))
    return records


def test_smallest_sufficient_rank_matches_a_brute_force_scan():
    rng = np.random.default_rng(0)
    for _ in range(50):
        errors = rng.uniform(0.05, 0.2, size=len(RANKS)).tolist()
        tolerance = rng.uniform(0, 0.3)
        best = min(errors)
        expected = next(r for r, e in sorted(zip(RANKS, errors)) if e <= best * (1 + tolerance))
        assert hyp.smallest_sufficient_rank(RANKS, errors, tolerance) == expected
    assert hyp.smallest_sufficient_rank([4, 1, 2], [0.1, 0.1, 0.3], 0.0) == 1
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        hyp.smallest_sufficient_rank(RANKS, [0.1] * 6, -0.1)
    with pytest.raises(ValueError, match="one error per rank"):
        hyp.smallest_sufficient_rank(RANKS, [0.1], 0.05)


def test_slope_through_origin_is_least_squares_without_intercept():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0.1, 2, 9), rng.uniform(0, 10, 9)
    expected = np.linalg.lstsq(x[:, None], y, rcond=None)[0][0]
    assert hyp.slope_through_origin(x, y) == pytest.approx(expected)


def test_permutation_p_value_is_exact_over_all_pairings_for_few_tasks():
    x, y = np.array([0.1, 0.5, 0.3, 0.9, 0.7]), np.array([1.0, 4.0, 4.0, 16.0, 8.0])
    observed = stats.spearmanr(x, y).statistic
    null = [stats.spearmanr(x, np.array(p)).statistic for p in itertools.permutations(y)]
    brute = np.mean([value >= observed - 1e-12 for value in null])
    assert hyp.permutation_p_value(x, y) == pytest.approx(brute)
    assert hyp.smallest_possible_p_value(5) == pytest.approx(1 / 120)
    assert hyp.permutation_p_value(x, np.ones(5)) == 1.0 and math.isnan(hyp.spearman_rho(x, np.ones(5)))


def test_bootstrap_interval_brackets_the_slope_and_collapses_on_an_exact_line():
    x = np.array([0.2, 0.5, 0.9, 1.4, 2.0, 2.5])
    assert hyp.bootstrap_slope_interval(x, 3 * x) == pytest.approx((3.0, 3.0))
    y = 3 * x + np.array([0.3, -0.2, 0.1, -0.4, 0.2, 0.1])
    low, high = hyp.bootstrap_slope_interval(x, y)
    assert low < hyp.slope_through_origin(x, y) < high and high - low < 1.0


def test_a_planted_proportional_relation_is_found():
    rank_stars = [1, 2, 2, 4, 8, 8, 16, 32]
    gaps = [r / 10 * f for r, f in zip(rank_stars, [1.1, 0.9, 1.05, 1.0, 0.95, 1.08, 1.0, 0.97])]
    result = hyp.evaluate_hypothesis(planted_records(rank_stars, gaps, seeds=(0, 1), noise=0.01), seed=0)
    assert [task.rank_star for task in result.tasks] == rank_stars
    assert [task.gap for task in result.tasks] == pytest.approx(gaps)
    fit, = result.fits
    assert fit.n_tasks == 8 and fit.spearman_rho > 0.95 and fit.p_value < 0.001
    assert fit.slope_interval[0] < 10 < fit.slope_interval[1]
    assert "support the hypothesis that the rank needed grows" in result.verdict
    assert "means over 2 seeds" in result.verdict


def test_a_planted_null_is_not_found():
    gaps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    rank_stars = [8, 2, 32, 1, 16, 4, 2, 8]  # no monotone relation to the gap
    result = hyp.evaluate_hypothesis(planted_records(rank_stars, gaps))
    assert [task.rank_star for task in result.tasks] == rank_stars
    fit, = result.fits
    assert abs(fit.spearman_rho) < 0.3 and fit.p_value > 0.2
    assert "does not reject 'no relation'" in result.verdict and "do not support" in result.verdict


def test_two_tasks_give_a_direction_but_the_verdict_says_they_cannot_be_evidence():
    result = hyp.evaluate_hypothesis(planted_records([2, 16], [0.2, 1.5]))
    fit, = result.fits
    assert fit.spearman_rho == pytest.approx(1.0) and fit.p_value == pytest.approx(0.5)
    assert "r* rises with the gap over 2 tasks" in result.verdict
    assert "no ordering can reach p < 0.05" in result.verdict and "at least 4 tasks" in result.verdict
    assert "one seed" in result.verdict


def test_allocation_compares_gap_aware_and_uniform_runs_of_one_rank():
    records = planted_records([4, 4], [0.5, 1.0])
    records.append(RunRecord(Path("ibp"), "task0", "lora", "gap-relative", 4, 0, 0.05, 0.05, 0.5, 3990, [0.6, 0.4], [6, 2]))
    result = hyp.evaluate_hypothesis(records)
    comparison, = result.allocation
    uniform = next(r for r in records if r.task == "task0" and r.rank == 4 and r.allocation == "uniform")
    assert (comparison.task, comparison.rank, comparison.gap_aware_error) == ("task0", 4, 0.05)
    assert comparison.uniform_error == uniform.test_error and comparison.uniform_params == 4000
    assert "lower test error than one uniform rank in 1 of 1" in result.verdict
    assert "within run-to-run noise" in result.verdict


def test_a_task_without_a_measured_gap_is_named():
    records = planted_records([2, 4], [0.2, 0.4])
    for record in records:
        if record.task == "task1":
            record.gaps = None
    with pytest.raises(ValueError, match="no run of task task1 measured the gap.*stage2.allocation=uniform"):
        hyp.evaluate_hypothesis(records)


@pytest.mark.slow
def test_hypothesis_command_on_a_finished_sweep(tiny_sweep, capsys):
    assert main(["hypothesis", str(tiny_sweep), "--resamples", "999"]) == 0
    out = capsys.readouterr().out
    assert "darcy" in out and "procedural" in out and "verdict:" in out
    saved = json.loads((tiny_sweep / "hypothesis.json").read_text())
    assert {task["task"] for task in saved["tasks"]} == {"darcy", "procedural"}
    assert saved["fits"][0]["n_tasks"] == 2 and saved["fits"][0]["smallest_p_value"] == 0.5
    assert saved["allocation"][0]["task"] == "darcy" and saved["allocation"][0]["rank"] == 2
    assert (tiny_sweep / "plots" / "rank_vs_gap.png").is_file()
