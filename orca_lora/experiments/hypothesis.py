"""The hypothesis "the LoRA rank needed is proportional to the modality gap", tested from saved
sweep runs (DESIGN 8).

Per task: r* = the smallest swept rank whose error is within a tolerance of the best, and the gap
D measured by stage 2 (mean over blocks; per block kept too). Across tasks: r* against D, as a
slope through the origin with a bootstrap interval, Spearman's rho and a one-sided permutation
p-value. Beside it, the allocation experiment: gap-aware (IBP) ranks against one uniform rank at
equal trainable parameters.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from orca_lora.choices import GAP_AWARE_ALLOCATIONS
from orca_lora.experiments.tables import RunRecord
from orca_lora.files import write_text_atomic

SIGNIFICANCE = 0.05


def smallest_sufficient_rank(ranks: Sequence[int], errors: Sequence[float], tolerance: float) -> int:
    """r* = min { r : e(r) <= (1 + tolerance) min_r' e(r') }: the smallest rank within a relative
    tolerance of the best error (DESIGN 8)."""
    if len(ranks) != len(errors) or not ranks:
        raise ValueError(f"need one error per rank, got {len(ranks)} ranks and {len(errors)} errors")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 (a relative error margin), got {tolerance}")
    threshold = (1.0 + tolerance) * min(errors)
    return min(rank for rank, error in zip(ranks, errors) if error <= threshold)


def slope_through_origin(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares b of y = b x: b = sum(x y) / sum(x^2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.dot(x, y) / np.dot(x, x))


def bootstrap_slope_interval(x: np.ndarray, y: np.ndarray, level: float = 0.95, n_resamples: int = 9999,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the slope through the origin, resampling (x, y) pairs
    (scipy.stats.bootstrap, paired)."""
    def slope(x_sample, y_sample, axis=-1):
        return np.sum(x_sample * y_sample, axis=axis) / np.sum(x_sample * x_sample, axis=axis)

    result = stats.bootstrap((np.asarray(x, float), np.asarray(y, float)), slope, paired=True, vectorized=True,
                             confidence_level=level, n_resamples=n_resamples, method="percentile",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (scipy); NaN when either side is constant."""
    if np.ptp(np.asarray(x, float)) == 0 or np.ptp(np.asarray(y, float)) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def permutation_p_value(x: np.ndarray, y: np.ndarray, n_resamples: int = 9999, seed: int = 0) -> float:
    """One-sided p-value of Spearman's rho > 0 under random pairings of x with y (scipy's
    permutation_test; exact when n! <= n_resamples). 1.0 when rho is undefined."""
    if math.isnan(spearman_rho(x, y)):
        return 1.0
    y = np.asarray(y, float)
    result = stats.permutation_test((np.asarray(x, float),), lambda permuted: stats.spearmanr(permuted, y).statistic,
                                    permutation_type="pairings", alternative="greater", n_resamples=n_resamples,
                                    rng=np.random.default_rng(seed))
    return float(result.pvalue)


def smallest_possible_p_value(n: int) -> float:
    """With n tasks an exact permutation test cannot go below 1 / n!."""
    return 1.0 / math.factorial(n)


@dataclass
class TaskRanks:
    task: str
    method: str
    ranks: list[int]  # swept uniform ranks
    errors: list[float]  # mean test error over seeds at each rank
    n_seeds: int
    rank_star: int
    gap: float  # mean over blocks (and over the task's runs)
    block_gaps: list[float]


@dataclass
class RankGapFit:
    method: str
    n_tasks: int
    slope: float  # r* per unit gap, through the origin
    slope_interval: tuple[float, float]
    spearman_rho: float
    p_value: float
    smallest_p_value: float


@dataclass
class AllocationComparison:
    task: str
    method: str
    rank: int  # the uniform rank whose parameter count the gap-aware ranks match
    uniform_error: float
    gap_aware_error: float
    uniform_params: int
    gap_aware_params: int
    n_seeds: int


@dataclass
class HypothesisResult:
    tolerance: float
    tasks: list[TaskRanks]
    fits: list[RankGapFit]
    allocation: list[AllocationComparison] = field(default_factory=list)
    verdict: str = ""


def task_gaps(records: Sequence[RunRecord]) -> dict[str, list[float]]:
    """Per task, the per-block gaps averaged over every run that measured them."""
    measured: dict[str, list[list[float]]] = defaultdict(list)
    for record in records:
        if record.gaps is not None:
            measured[record.task].append(record.gaps)
    return {task: np.mean(np.array(gaps), axis=0).tolist() for task, gaps in measured.items()}


def rank_sweeps(records: Sequence[RunRecord], tolerance: float) -> list[TaskRanks]:
    """r* per (task, method) from the uniform-rank runs; each task needs its gap measured."""
    gaps = task_gaps(records)
    sweeps: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
    for record in records:
        if record.allocation == "uniform":
            sweeps[(record.task, record.method)][record.rank].append(record.test_error)
            seeds[(record.task, record.method)].add(record.seed)
    result = []
    for (task, method), by_rank in sorted(sweeps.items()):
        if task not in gaps:
            raise ValueError(f"no run of task {task} measured the gap; keep stage2.enabled=true "
                             "(stage2.allocation=uniform measures the gap and still uses one rank)")
        ranks = sorted(by_rank)
        errors = [statistics.fmean(by_rank[rank]) for rank in ranks]
        result.append(TaskRanks(task, method, ranks, errors, len(seeds[(task, method)]),
                                smallest_sufficient_rank(ranks, errors, tolerance),
                                float(np.mean(gaps[task])), gaps[task]))
    return result


def fit_rank_to_gap(tasks: Sequence[TaskRanks], n_resamples: int = 9999, seed: int = 0) -> list[RankGapFit]:
    """One fit of r* on the mean gap per method, over the tasks swept with it (at least 2)."""
    fits = []
    for method in sorted({task.method for task in tasks}):
        chosen = [task for task in tasks if task.method == method]
        if len(chosen) < 2:
            continue
        gap = np.array([task.gap for task in chosen])
        rank_star = np.array([task.rank_star for task in chosen], float)
        fits.append(RankGapFit(method, len(chosen), slope_through_origin(gap, rank_star),
                               bootstrap_slope_interval(gap, rank_star, n_resamples=n_resamples, seed=seed),
                               spearman_rho(gap, rank_star), permutation_p_value(gap, rank_star, n_resamples, seed),
                               smallest_possible_p_value(len(chosen))))
    return fits


def compare_allocations(records: Sequence[RunRecord]) -> list[AllocationComparison]:
    """Gap-aware runs (`gap-relative` or `gap` ranks) against the uniform runs of the same task,
    method and rank."""
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.allocation in GAP_AWARE_ALLOCATIONS:
            groups[(record.task, record.method, record.rank)]["gap"].append(record)
        elif record.allocation == "uniform":
            groups[(record.task, record.method, record.rank)]["uniform"].append(record)
    comparisons = []
    for (task, method, rank), pair in sorted(groups.items()):
        if pair["gap"] and pair["uniform"]:
            comparisons.append(AllocationComparison(
                task, method, rank, statistics.fmean(r.test_error for r in pair["uniform"]),
                statistics.fmean(r.test_error for r in pair["gap"]),
                round(statistics.fmean(r.trainable_params for r in pair["uniform"])),
                round(statistics.fmean(r.trainable_params for r in pair["gap"])),
                min(len(pair["gap"]), len(pair["uniform"]))))
    return comparisons


def evaluate_hypothesis(records: Sequence[RunRecord], tolerance: float = 0.05, n_resamples: int = 9999,
                        seed: int = 0) -> HypothesisResult:
    tasks = rank_sweeps(records, tolerance)
    if not tasks:
        raise ValueError("no uniform-rank runs to find r* from; sweep stage3.rank with stage2.allocation=uniform")
    result = HypothesisResult(tolerance, tasks, fit_rank_to_gap(tasks, n_resamples, seed), compare_allocations(records))
    result.verdict = verdict(result)
    return result


def _fit_sentence(fit: RankGapFit, tasks: Sequence[TaskRanks]) -> str:
    chosen = sorted((task for task in tasks if task.method == fit.method), key=lambda task: task.gap)
    listing = ", ".join(f"{task.task} r*={task.rank_star} at gap {task.gap:.3g}" for task in chosen)
    if math.isnan(fit.spearman_rho):
        constant = "r*" if len({task.rank_star for task in chosen}) == 1 else "the gap"
        return (f"{fit.method}: {constant} is the same on all {fit.n_tasks} tasks ({listing}), so these runs say "
                "nothing about how the rank needed follows the gap.")
    direction = "rises" if fit.spearman_rho > 0 else "falls" if fit.spearman_rho < 0 else "does not move"
    low, high = fit.slope_interval
    sentence = (f"{fit.method}: r* {direction} with the gap over {fit.n_tasks} tasks ({listing}; Spearman rho "
                f"{fit.spearman_rho:+.2f}; slope through the origin {fit.slope:.3g} ranks per unit gap, 95% "
                f"bootstrap interval [{low:.3g}, {high:.3g}]).")
    if fit.smallest_p_value > SIGNIFICANCE:
        return sentence + (f" With {fit.n_tasks} tasks no ordering can reach p < {SIGNIFICANCE} (the exact "
                           f"permutation floor is 1/{fit.n_tasks}! = {fit.smallest_p_value:.3g}; p = "
                           f"{fit.p_value:.3g}), so this is a direction, not evidence: a test needs at least 4 tasks.")
    if fit.p_value < SIGNIFICANCE and fit.spearman_rho > 0:
        return sentence + (f" The permutation test rejects 'no relation' (one-sided p = {fit.p_value:.3g}): the runs "
                           "support the hypothesis that the rank needed grows with the gap.")
    return sentence + (f" The permutation test does not reject 'no relation' (one-sided p = {fit.p_value:.3g}): "
                       "the runs do not support the hypothesis.")


def verdict(result: HypothesisResult) -> str:
    """What the numbers support and what they cannot, in sentences."""
    sentences = [_fit_sentence(fit, result.tasks) for fit in result.fits]
    if not result.fits:
        sentences.append("Only one task was swept per method: relating rank to gap needs at least two tasks "
                         "(four for a permutation test at 0.05).")
    seeds = min(task.n_seeds for task in result.tasks)
    sentences.append(f"r* is the smallest swept rank within {result.tolerance:.0%} of the best error; "
                     + ("each error comes from one seed, so r* can move by a rank step between seeds (sweep "
                        "`seed` to measure that spread)." if seeds == 1 else f"errors are means over {seeds} seeds."))
    if result.allocation:
        wins = sum(c.gap_aware_error < c.uniform_error for c in result.allocation)
        mean_difference = statistics.fmean(c.gap_aware_error - c.uniform_error for c in result.allocation)
        sentences.append(f"At equal trainable parameters, gap-aware ranks gave a lower test error than one uniform "
                         f"rank in {wins} of {len(result.allocation)} comparisons (mean difference "
                         f"{mean_difference:+.4f})"
                         + ("; with one seed each, differences this small are within run-to-run noise."
                            if min(c.n_seeds for c in result.allocation) == 1 else "."))
    return " ".join(sentences)


def format_hypothesis(result: HypothesisResult) -> str:
    """Plain-text report: r* per task, the fits, the allocation comparisons and the verdict."""
    lines = [f"r* = smallest rank within {result.tolerance:.0%} of the best test error (mean over seeds)", "",
             f"{'task':<28} {'method':<10} {'mean gap':>9} {'r*':>4}  errors by rank"]
    for task in result.tasks:
        errors = "  ".join(f"r{rank}:{error:.4f}" for rank, error in zip(task.ranks, task.errors))
        lines.append(f"{task.task:<28} {task.method:<10} {task.gap:>9.4f} {task.rank_star:>4}  {errors}")
    lines += ["", "gap per block:"]
    lines += [f"  {task.task:<26} " + " ".join(f"{gap:.3f}" for gap in task.block_gaps)
              for task in {task.task: task for task in result.tasks}.values()]
    for fit in result.fits:
        low, high = fit.slope_interval
        lines += ["", f"fit r* ~ b * gap ({fit.method}, {fit.n_tasks} tasks): b = {fit.slope:.4g} "
                      f"[{low:.4g}, {high:.4g}] 95% bootstrap; Spearman rho = {fit.spearman_rho:+.3f}; "
                      f"one-sided permutation p = {fit.p_value:.4g} (floor {fit.smallest_p_value:.3g})"]
    if result.allocation:
        lines += ["", f"{'allocation at equal params':<28} {'rank':>4} {'uniform':>9} {'gap-aware':>9} "
                      f"{'params uniform':>15} {'params gap-aware':>17}"]
        lines += [f"{c.task + ' ' + c.method:<28} {c.rank:>4} {c.uniform_error:>9.4f} {c.gap_aware_error:>9.4f} "
                  f"{c.uniform_params:>15,} {c.gap_aware_params:>17,}" for c in result.allocation]
    return "\n".join(lines + ["", "verdict: " + result.verdict])


def write_hypothesis(result: HypothesisResult, directory: Path) -> Path:
    """`hypothesis.json` in `directory`: every number above, and the verdict."""
    path = directory / "hypothesis.json"
    write_text_atomic(path, json.dumps(asdict(result), indent=2) + "\n")
    return path
