"""Does the LoRA rank a task needs grow with its modality gap D? The study's analysis (`configs/study_gap.md`).

Per task: a sweep over ranks r_1 < ... < r_R, S seeds, per-sample validation errors (S, R, N), paired
across seeds and ranks (the same validation samples). Definitions, fixed by the plan:
- e(r): the mean error at rank r over seeds and samples; e_best = min_r e(r); the attainable gain
  A = e(r_1) - e_best; r* = the smallest swept r with e(r) <= e_best + f A (f = gain_fraction, the
  tolerance as a fraction of the gain: this study's plan), r* = r_1 when A = 0.
  With the un-adapted model's errors e(0) (a curve's `unadapted`: the rank-0 run), the log-gain rule of
  the plan's amendment instead: r* = the smallest swept r with e(r) <= e_best (e(0) / e_best)^f,
  r* = r_1 when e(0) <= e_best.
- r* censors the true threshold on the log2 scale: r* = r_k gives (log2 r_{k-1}, log2 r_k], r* = r_1
  gives (-inf, log2 r_1], r* = r_R gives (log2 r_{R-1}, +inf) (the grid cannot tell whether more rank
  would still help).
- the rank benefit G = (e(r_1) - e(r_R)) / e(r_R).
- the law: log2 r*_t = a + beta log2 D_t + N(0, sigma^2), fitted by interval-censored maximum
  likelihood (`censored_regression`: Lindsey 1998; Tobin 1958). beta is the elasticity of r* in D
  (r* ~ D^beta), so beta = 1 is proportionality.
- beta's interval: a two-stage percentile bootstrap (Efron & Tibshirani 1993, ch. 13; Davison &
  Hinkley 1997, sec. 3.8): resample the tasks, and within each drawn task its seeds and its validation
  samples (one draw of sample indices applied to every seed and rank, keeping the pairing); joined, when
  zero-scatter lines meet every task's interval, by their slopes (beta is then set-identified: Manski &
  Tamer 2002; the plan's amendment of 21:25).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from orca_lora.studies.stats.bootstrap import (
    percentile_interval,
    resampled_means,
    resampling_counts,
    seed_standard_error,
)
from orca_lora.studies.stats.censored_regression import (CensoredLine, exact_line_slopes, fit_censored_line,
                                                          fit_censored_mean, identified_hull, identified_p_value)

EQUIVALENCE = 0.5  # |beta| below which r* is declared not to follow the gap ("flat")
VERDICTS = ("proportional", "grows", "falls", "flat", "no evidence")
MIN_DISTINCT_GAPS = 3


@dataclass
class TaskCurve:
    task: str
    gap: float  # D_t > 0 (the primary gap)
    ranks: np.ndarray  # (R,) sorted ascending
    errors: np.ndarray  # (S, R, N) per seed, rank, validation sample
    unadapted: Optional[np.ndarray] = None  # (S, N): the rank-0 run per seed on the same samples; r* by log gain


@dataclass
class TaskRank:
    task: str
    gap: float
    r_star: int
    log2_interval: tuple[float, float]  # the censoring interval of log2 r*
    r_star_percentiles: tuple[float, float]  # bootstrap 2.5 / 97.5 percentiles (at the fit's level)
    r_star_fractions: dict[int, float]  # bootstrap fraction of replicates at each grid rank
    rank_benefit: float  # G = (e(r_min) - e(r_max)) / e(r_max)
    rank_benefit_interval: tuple[float, float]
    mean_errors: np.ndarray  # e(r) per rank
    seed_se: np.ndarray  # standard error of e(r) over seeds per rank (NaN with one seed)


@dataclass
class RankLawFit:
    slope: float  # beta-hat: r* ~ D^beta
    slope_interval: tuple[float, float]
    intercept: float  # a: log2 r* at D = 1
    sigma: float  # scatter of log2 r* about the line
    p_slope_zero: float
    p_slope_one: float
    verdict: str
    spearman_rho: float
    spearman_p: float  # one-sided (rho > 0), permutation over pairings
    loto_error_gap: float  # mean leave-one-task-out distance (log2 units) to the left-out interval
    loto_error_no_gap: float  # the same for the gap-free (intercept-only) predictor
    n_resamples: int
    level: float
    tasks: list[TaskRank]


def _check_curve(ranks: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranks, errors = np.asarray(ranks), np.asarray(errors, float)
    if ranks.ndim != 1 or ranks.size < 2:
        raise ValueError(f"a rank sweep needs at least 2 ranks, got {ranks.size}: sweep more ranks")
    if np.any(ranks <= 0) or np.any(ranks != np.round(ranks)):
        raise ValueError(f"ranks must be positive integers, got {ranks.tolist()}")
    if np.any(np.diff(ranks) <= 0):
        raise ValueError(f"ranks must be sorted ascending without repeats, got {ranks.tolist()}: sort "
                         "the ranks and the errors' rank axis together")
    if errors.ndim != 3 or errors.shape[1] != ranks.size or errors.shape[0] < 1 or errors.shape[2] < 1:
        raise ValueError(f"errors must have shape (seeds, {ranks.size} ranks, samples), got "
                         f"{errors.shape}: one error per seed, rank and validation sample")
    if not np.all(np.isfinite(errors)):
        raise ValueError("errors contain NaN or inf: drop or rerun the failed runs")
    return ranks.astype(int), errors


def _check_unadapted(unadapted: Optional[np.ndarray], errors: np.ndarray) -> Optional[np.ndarray]:
    if unadapted is None:
        return None
    unadapted = np.asarray(unadapted, float)
    if unadapted.shape != (errors.shape[0], errors.shape[2]):
        raise ValueError(f"unadapted errors must have shape ({errors.shape[0]} seeds, {errors.shape[2]} samples), got "
                         f"{unadapted.shape}: the rank-0 run of every seed, on the same validation samples")
    if not np.all(np.isfinite(unadapted)) or errors.mean(axis=(0, 2)).min() <= 0:
        raise ValueError("the log-gain rule needs finite unadapted errors and positive mean errors at every rank")
    return unadapted


def threshold_index(mean_errors: np.ndarray, gain_fraction: float,
                    unadapted: Optional[np.ndarray] = None) -> np.ndarray:
    """Index of r* along the last axis of e(r) (any leading batch shape): the first r with
    e(r) <= e_best + f (e(r_1) - e_best); with `unadapted` (e(0), the leading shape), the first r with
    e(r) <= e_best (e(0) / e_best)^f, and r_1 where e(0) <= e_best. The argmin always qualifies."""
    best = mean_errors.min(axis=-1, keepdims=True)
    if unadapted is None:
        gain = mean_errors[..., :1] - best
        return np.argmax(mean_errors <= best + gain_fraction * gain, axis=-1)
    reference = np.asarray(unadapted, float)[..., None]
    tolerance = best * (np.maximum(reference, best) / best) ** gain_fraction
    return np.where(reference[..., 0] <= best[..., 0], 0, np.argmax(mean_errors <= tolerance, axis=-1))


def index_interval(ranks: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The log2 censoring interval (low, high] of r* = ranks[index], elementwise."""
    log_ranks = np.log2(np.asarray(ranks, float))
    index = np.asarray(index)
    low = np.where(index == 0, -np.inf, log_ranks[np.maximum(index - 1, 0)])
    high = np.where(index == len(ranks) - 1, np.inf, log_ranks[index])
    return low, high


def smallest_sufficient_rank(ranks: np.ndarray, errors: np.ndarray, gain_fraction: float = 0.1,
                             unadapted: Optional[np.ndarray] = None) -> int:
    """r* = the smallest swept rank with e(r) <= e_best + f A, A = e(r_min) - e_best (the plan); with
    `unadapted` (S, N), the log-gain r*: e(r) <= e_best (e(0) / e_best)^f (the plan's amendment)."""
    ranks, errors = _check_curve(ranks, errors)
    unadapted = _check_unadapted(unadapted, errors)
    return int(ranks[threshold_index(errors.mean(axis=(0, 2)), gain_fraction,
                                     None if unadapted is None else unadapted.mean())])


def smallest_unbeaten_rank(ranks: np.ndarray, errors: np.ndarray, alpha: float = 0.05) -> int:
    """The paired r*: the smallest swept rank whose per-sample validation errors (mean over seeds) are not
    worse than the best rank's, by a one-sided paired t-test over the samples at level `alpha`
    (scipy's `ttest_rel`, alternative "greater"). Unlike the gain-fraction rule it has no tolerance
    to hide a small but consistent shortfall. The best rank is the one with the smallest e(r)."""
    ranks, errors = _check_curve(ranks, errors)
    per_sample = errors.mean(axis=0)  # (R, N)
    best = int(np.argmin(per_sample.mean(axis=1)))
    for index in range(best):
        differences = per_sample[index] - per_sample[best]
        if not np.any(differences) or stats.ttest_rel(per_sample[index], per_sample[best],
                                                       alternative="greater").pvalue >= alpha:
            return int(ranks[index])
    return int(ranks[best])


def smallest_level_rank(ranks: np.ndarray, errors: np.ndarray, tolerance: float = 0.15) -> int:
    """The ratio r*: the smallest swept rank with e(r) <= (1 + tolerance) e_best (e: the mean over seeds and
    samples). Its tolerance scales with the best error, not with the gain, so a shortfall worth a few percent
    of a large gain still counts; on a flat curve it is the smallest rank. 15%: the relative difference the
    plan calls level in its minimum-of-training check."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    ranks, errors = _check_curve(ranks, errors)
    mean_errors = errors.mean(axis=(0, 2))
    return int(ranks[np.argmax(mean_errors <= (1 + tolerance) * mean_errors.min())])


def rank_interval(ranks: np.ndarray, errors: np.ndarray, gain_fraction: float = 0.1,
                  unadapted: Optional[np.ndarray] = None) -> tuple[float, float]:
    """The interval (low, high] of log2 (true threshold rank) that r* censors: (log2 r_{k-1}, log2 r_k],
    -inf below r_min, +inf above r_max."""
    index = np.searchsorted(np.asarray(ranks), smallest_sufficient_rank(ranks, errors, gain_fraction, unadapted))
    low, high = index_interval(np.asarray(ranks), index)
    return float(low), float(high)


def relative_benefit(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """G = (e(r_min) - e(r_max)) / e(r_max) from the two ranks' mean errors (elementwise)."""
    return (low - high) / high


def benefit_from_means(mean_errors: np.ndarray) -> np.ndarray:
    """G along the last axis of e(r) (`relative_benefit` of its first and last rank)."""
    return relative_benefit(mean_errors[..., 0], mean_errors[..., -1])


def rank_benefit(ranks: np.ndarray, errors: np.ndarray) -> float:
    """G = (e(r_min) - e(r_max)) / e(r_max): the relative error removed by the largest swept rank."""
    ranks, errors = _check_curve(ranks, errors)
    mean_errors = errors.mean(axis=(0, 2))
    if mean_errors[-1] <= 0:
        raise ValueError("e(r_max) must be positive for the relative rank benefit G")
    return float(benefit_from_means(mean_errors))


def verdict_label(low: float, high: float) -> str:
    """The plan's verdict from beta's interval (low, high): 'proportional' (low > 0, 1 inside),
    'grows' (low > 0, 1 outside), 'falls' (high < 0), 'flat' (0 inside and the interval within
    [-EQUIVALENCE, EQUIVALENCE]), else 'no evidence'."""
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        return "no evidence"
    if low > 0:
        return "proportional" if low <= 1 <= high else "grows"
    if high < 0:
        return "falls"
    if -EQUIVALENCE <= low and high <= EQUIVALENCE:
        return "flat"
    return "no evidence"


def declares_growth(label: str) -> bool:
    """True for the verdicts that say r* grows with the gap."""
    if label not in VERDICTS:
        raise ValueError(f"unknown verdict {label!r}; one of {', '.join(VERDICTS)}")
    return label in ("proportional", "grows")


def check_curves(curves: Sequence[TaskCurve]) -> None:
    """ValueError naming the problem: fewer than 3 tasks or distinct gaps, bad gaps, bad curves."""
    if len(curves) < 3:
        raise ValueError(f"the rank law needs at least 3 tasks, got {len(curves)}: add tasks")
    for curve in curves:
        if not (np.isfinite(curve.gap) and curve.gap > 0):
            raise ValueError(f"task {curve.task!r}: the gap must be a positive number, got {curve.gap}")
        try:
            _check_unadapted(curve.unadapted, _check_curve(curve.ranks, curve.errors)[1])
        except ValueError as error:
            raise ValueError(f"task {curve.task!r}: {error}") from None
    if len({float(curve.gap) for curve in curves}) < MIN_DISTINCT_GAPS:
        raise ValueError(f"the rank law needs at least {MIN_DISTINCT_GAPS} distinct gaps: add tasks "
                         "with other gaps")


def draw_tasks(gaps: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, T) task indices drawn with replacement; a replicate with fewer than 3 distinct
    gaps is redrawn (its line would not be identified)."""
    n_tasks = len(gaps)
    draws = rng.integers(0, n_tasks, (n_resamples, n_tasks))
    while True:
        distinct = np.array([np.unique(gaps[row]).size for row in draws])
        bad = distinct < MIN_DISTINCT_GAPS
        if not bad.any():
            return draws
        draws[bad] = rng.integers(0, n_tasks, (int(bad.sum()), n_tasks))


@dataclass
class BootstrapDraws:
    """One study's bootstrap: the replicates' data sets and the within-task draws behind them."""
    x: np.ndarray  # (B, T) log2 gaps of the drawn tasks
    low: np.ndarray  # (B, T) censoring intervals of the within-task resampled r*
    high: np.ndarray
    task_index: np.ndarray  # (B, T) which task each slot holds
    r_star: np.ndarray  # (B, T) the slot's resampled r*
    rank_benefit: np.ndarray  # (B, T) the slot's resampled G


def bootstrap_draws(curves: Sequence[TaskCurve], n_resamples: int, rng: np.random.Generator,
                    gain_fraction: float = 0.1) -> BootstrapDraws:
    """Two-stage bootstrap: draw tasks, then for every drawn slot an independent within-task draw of
    seeds and samples, from which e*(r), r*, its interval and G are recomputed (each task on its own
    rank grid)."""
    gaps = np.array([curve.gap for curve in curves], float)
    task_index = draw_tasks(gaps, n_resamples, rng)
    low, high = np.empty(task_index.shape), np.empty(task_index.shape)
    r_star, benefit = np.empty(task_index.shape, int), np.empty(task_index.shape)
    for t, curve in enumerate(curves):
        slots = task_index == t
        errors = np.asarray(curve.errors, float)
        counts = resampling_counts(errors.shape[0], errors.shape[2], int(slots.sum()), rng)
        means = resampled_means(errors, counts)
        # the rank-0 run resampled with the same seeds and samples as the curve it measures from
        unadapted = None if curve.unadapted is None else resampled_means(np.asarray(curve.unadapted, float), counts)
        index = threshold_index(means, gain_fraction, unadapted)
        low[slots], high[slots] = index_interval(curve.ranks, index)
        r_star[slots], benefit[slots] = np.asarray(curve.ranks)[index], benefit_from_means(means)
    return BootstrapDraws(np.log2(gaps)[task_index], low, high, task_index, r_star, benefit)


def interval_distance(prediction: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Distance from a predicted log2 r* to the censoring interval, 0 inside."""
    return np.maximum(np.maximum(low - prediction, prediction - high), 0.0)


def leave_one_task_out(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
    """Mean leave-one-task-out error (log2 units) of the fitted line's prediction of each left-out
    task's log2 r*, and of the gap-free predictor (the others' censored-normal mean, beta fixed at 0)."""
    n = len(x)
    keep = ~np.eye(n, dtype=bool)
    others = [a[None, :].repeat(n, 0)[keep].reshape(n, n - 1) for a in (x, low, high)]
    line = fit_censored_line(*others)
    mean = fit_censored_mean(others[1], others[2])
    error_gap = interval_distance(line.intercept + line.slope * x, low, high)
    error_no_gap = interval_distance(mean.intercept, low, high)
    return float(error_gap.mean()), float(error_no_gap.mean())


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    rank_x, rank_y = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rank_x = rank_x - rank_x.mean(axis=axis, keepdims=True)
    rank_y = rank_y - rank_y.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_x * rank_y).sum(axis) / np.sqrt((rank_x ** 2).sum(axis) * (rank_y ** 2).sum(axis))


def spearman_permutation(gaps: np.ndarray, r_star: np.ndarray, rng: np.random.Generator,
                         n_resamples: int = 9999) -> tuple[float, float]:
    """Spearman's rho between D and r* and its one-sided (rho > 0) permutation p over pairings
    (scipy.stats.permutation_test; exact when T! <= n_resamples). No spread in r*: (NaN, 1)."""
    if np.unique(r_star).size < 2:
        return float("nan"), 1.0
    result = stats.permutation_test((np.asarray(gaps, float), np.asarray(r_star, float)), _spearman,
                                    permutation_type="pairings", alternative="greater", vectorized=True,
                                    n_resamples=n_resamples, random_state=rng)
    return float(result.statistic), float(result.pvalue)


def _task_summary(curve: TaskCurve, gain_fraction: float, draws: BootstrapDraws, t: int,
                  level: float) -> TaskRank:
    ranks, errors = _check_curve(curve.ranks, curve.errors)
    means = errors.mean(axis=(0, 2))
    seed_se = seed_standard_error(errors.mean(axis=2), axis=0)
    slots = draws.task_index == t
    r_boot, g_boot = draws.r_star[slots], draws.rank_benefit[slots]
    if r_boot.size == 0:  # never drawn (possible only with very few replicates)
        r_boot, g_boot = np.array([np.nan]), np.array([np.nan])
    r_low, r_high = percentile_interval(r_boot, level)
    g_low, g_high = percentile_interval(g_boot, level)
    fractions = {int(r): float(np.mean(r_boot == r)) for r in ranks}
    reference = curve.unadapted
    return TaskRank(curve.task, float(curve.gap), smallest_sufficient_rank(ranks, errors, gain_fraction, reference),
                    rank_interval(ranks, errors, gain_fraction, reference), (float(r_low), float(r_high)), fractions,
                    rank_benefit(ranks, errors), (float(g_low), float(g_high)), means, seed_se)


def observed_intervals(curves: Sequence[TaskCurve], gain_fraction: float):
    """(x = log2 D, low, high) of the original data, one entry per task."""
    x = np.log2([curve.gap for curve in curves])
    bounds = np.array([rank_interval(curve.ranks, curve.errors, gain_fraction, curve.unadapted) for curve in curves])
    return x, bounds[:, 0], bounds[:, 1]


def fit_threshold_law(curves: Sequence[TaskCurve], gain_fraction: float = 0.1, n_resamples: int = 999,
                 seed: int = 0, level: float = 0.95) -> RankLawFit:
    """Fit log2 r* = a + beta log2 D + N(0, sigma^2) to the tasks' censored r*, with beta's two-stage
    percentile bootstrap interval (joined by the exact lines' slopes: `identified_hull`) and bootstrap
    p-values (beta = 0, beta = 1), the verdict, Spearman's rho with
    its permutation p, leave-one-task-out errors with and without the gap, and per-task summaries.
    Deterministic in `seed`."""
    check_curves(curves)
    if not 0 <= gain_fraction < 1:
        raise ValueError(f"gain_fraction must lie in [0, 1), got {gain_fraction}")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    rng = np.random.default_rng(seed)
    x, low, high = observed_intervals(curves, gain_fraction)
    point: CensoredLine = fit_censored_line(x, low, high)
    draws = bootstrap_draws(curves, n_resamples, rng, gain_fraction)
    slopes = fit_censored_line(draws.x, draws.low, draws.high).slope
    exact = exact_line_slopes(x, low, high)
    slope_low, slope_high = identified_hull(percentile_interval(slopes, level), exact)
    tasks = [_task_summary(curve, gain_fraction, draws, t, level) for t, curve in enumerate(curves)]
    rho, rho_p = spearman_permutation(2.0 ** x, np.array([task.r_star for task in tasks]), rng)
    loto_gap, loto_no_gap = leave_one_task_out(x, low, high)
    return RankLawFit(point.slope, (slope_low, slope_high), point.intercept, point.sigma,
                      identified_p_value(slopes, 0.0, exact), identified_p_value(slopes, 1.0, exact),
                      verdict_label(slope_low, slope_high), rho, rho_p, loto_gap, loto_no_gap,
                      n_resamples, level, tasks)
