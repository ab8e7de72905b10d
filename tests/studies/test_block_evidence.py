"""block_evidence: per-block points and trends against statsmodels and scipy fitted directly.
(energy_points reads trained weights; it is not tested on fabricated runs.)"""
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from study_toys import BLOCKS, modules, write_study_run

from orca_lora.studies.block_evidence import (BlockPoint, mixed_model_trend, one_block_points,
                                              posterior_points, within_task_trends)
from orca_lora.studies.study_runs import read_study, Regime

FROZEN = Regime(False)
SLOPE = 0.8
TASKS = {"darcy": (0.05, 5.5), "procedural": (0.5, 3.5), "spectrogram": (2.0, 2.0)}  # base gap, intercept


def write_ibp_runs(root, rng):
    """ibp-lora runs, 2 seeds per task: module ranks around 2^(a_t + SLOPE log2 D_i) - 1."""
    planted = {}
    for task, (base, intercept) in TASKS.items():
        for seed in (0, 1):
            gaps = base * np.geomspace(1, 16, len(BLOCKS)) * (1 + 0.05 * rng.standard_normal(len(BLOCKS)))
            posterior = {}
            for block, gap in zip(BLOCKS, gaps):
                center = 2 ** (intercept + SLOPE * math.log2(gap) + 0.1 * rng.standard_normal()) - 1
                for module in modules(block):
                    posterior[module] = int(max(0, round(center + rng.integers(-1, 2))))
            write_study_run(root, f"{task}_ibp_s{seed}", task=task, method="ibp-lora", allocation="flat", seed=seed,
                            val_errors=np.full(3, 0.1), test_errors=np.full(3, 0.1), block_gaps=gaps,
                            posterior_ranks=posterior)
            planted[task, seed] = (gaps, posterior)
    write_study_run(root, "darcy_lora", task="darcy", seed=0, val_errors=np.full(3, 0.1),
                    test_errors=np.full(3, 0.1), block_gaps=np.ones(len(BLOCKS)))  # not an ibp-lora run
    return planted


def test_posterior_points_and_the_mixed_model_against_statsmodels(tmp_path):
    planted = write_ibp_runs(tmp_path, np.random.default_rng(0))
    points = posterior_points(read_study([tmp_path]), FROZEN)
    assert [(p.task, p.block) for p in points] == [(t, b) for t in sorted(TASKS) for b in range(len(BLOCKS))]
    rows = []
    for point in points:
        gaps = [planted[point.task, seed][0][point.block] for seed in (0, 1)]
        means = [np.mean([planted[point.task, seed][1][m] for m in modules(BLOCKS[point.block])]) for seed in (0, 1)]
        assert point.name == BLOCKS[point.block] and point.n_seeds == 2
        assert point.gap == pytest.approx(np.mean(gaps), rel=1e-5)
        assert point.value == pytest.approx(np.mean(means))
        assert point.se == pytest.approx(np.std(means, ddof=1) / math.sqrt(2))
        rows.append((point.task, math.log2(np.mean(gaps)), math.log2(1 + np.mean(means))))
    trend = mixed_model_trend(points, "posterior")
    frame = pd.DataFrame(rows, columns=["task", "x", "y"])
    direct = smf.mixedlm("y ~ x", frame, groups=frame["task"]).fit(reml=True)
    assert trend.task is None and trend.n_points == len(rows) and trend.what == "posterior"
    assert trend.statistic == pytest.approx(direct.params["x"], rel=1e-4)
    assert trend.interval == pytest.approx(tuple(direct.conf_int().loc["x"]), rel=1e-4)
    assert trend.p_value == pytest.approx(direct.pvalues["x"], rel=1e-3, abs=1e-12)
    assert abs(trend.statistic - SLOPE) < 0.15  # the planted slope, through integer ranks
    assert trend.interval[0] < SLOPE < trend.interval[1]
    assert posterior_points(read_study([tmp_path]), Regime(True)) == []


def test_mixed_model_needs_two_tasks_and_drops_zero_gaps():
    point = lambda task, block, gap, value: BlockPoint(task, block, f"b{block}", gap, value, math.nan, 1)
    one_task = [point("a", b, 0.1 * (b + 1), b) for b in range(6)]
    assert mixed_model_trend(one_task, "x") is None
    zero = [point("b", b, 0.0 if b == 0 else 0.2 * b, 2 * b + 1) for b in range(6)]
    trend = mixed_model_trend(one_task + zero, "x")
    assert trend is not None and trend.n_points == 11
    assert mixed_model_trend([point(t, b, 0.1 * (b + 1), 3) for t in "ab" for b in range(4)], "x") is None


def write_one_block_runs(root):
    """Reference r = 8 per seed, block i at rank 1 with val error up by delta[seed][i]."""
    gaps = {0: np.array([0.1, 0.4, 0.2, 0.8, 0.3, 0.6]), 1: np.array([0.12, 0.38, 0.22, 0.82, 0.28, 0.62])}
    reference = {0: 0.2, 1: 0.25}
    deltas = {0: np.array([0.01, 0.04, 0.00, 0.09, 0.02, 0.05]), 1: np.array([0.03, 0.02, 0.01, 0.07, 0.02, 0.06])}
    for seed in (0, 1):
        write_study_run(root, f"ref_s{seed}", rank=8, seed=seed, val_errors=np.full(3, reference[seed]),
                        test_errors=np.full(3, 0.9), block_gaps=gaps[seed])
        write_study_run(root, f"ref4_s{seed}", rank=4, seed=seed, val_errors=np.full(3, 0.5),
                        test_errors=np.full(3, 0.9), block_gaps=gaps[seed])  # another rank: not a reference
        for block in range(6):
            write_study_run(root, f"b{block}_s{seed}", rank=8, seed=seed, block_ranks={block: 1},
                            val_errors=np.full(3, reference[seed] + deltas[seed][block]),
                            test_errors=np.full(3, 0.0), block_gaps=gaps[seed] * 3)
    write_study_run(root, "b0_s2", rank=8, seed=2, block_ranks={0: 1}, val_errors=np.full(3, 5.0),
                    test_errors=np.full(3, 0.0), block_gaps=gaps[0])  # no reference on seed 2: left out
    return gaps, deltas


def test_one_block_points_pair_each_block_run_with_its_seeds_reference(tmp_path):
    gaps, deltas = write_one_block_runs(tmp_path)
    points = one_block_points(read_study([tmp_path]), FROZEN)
    assert [(p.task, p.block, p.name, p.n_seeds) for p in points] == [("darcy", b, BLOCKS[b], 2) for b in range(6)]
    for point in points:
        values = [deltas[0][point.block], deltas[1][point.block]]
        assert point.value == pytest.approx(np.mean(values))
        assert point.se == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
        assert point.gap == pytest.approx((gaps[0][point.block] + gaps[1][point.block]) / 2, rel=1e-5)
    trend, = within_task_trends(points, "one block")
    expected = stats.spearmanr([p.gap for p in points], [p.value for p in points])
    assert trend.task == "darcy" and trend.n_points == 6 and trend.interval is None
    assert trend.statistic == pytest.approx(expected.statistic) and trend.p_value == pytest.approx(expected.pvalue)
    assert trend.statistic > 0.8


def test_within_task_trends_skip_tasks_without_spread_or_points():
    rng = np.random.default_rng(5)
    point = lambda task, block, gap, value: BlockPoint(task, block, f"b{block}", gap, value, math.nan, 1)
    points = [point("a", b, g, v) for b, (g, v) in enumerate(zip(rng.uniform(0, 1, 6), rng.uniform(0, 1, 6)))]
    points += [point("flat", b, 0.1 * b, 1.0) for b in range(6)]  # no spread in the values
    points += [point("few", b, 0.1 * b, b) for b in range(2)]  # two points only
    points += [point("same-gap", b, 0.3, b) for b in range(4)]
    trend, = within_task_trends(points, "w")
    mine = [p for p in points if p.task == "a"]
    assert trend.task == "a"
    assert trend.statistic == pytest.approx(stats.spearmanr([p.gap for p in mine], [p.value for p in mine]).statistic)
