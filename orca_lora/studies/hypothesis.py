"""The hypothesis "the LoRA rank needed grows with the modality gap", tested from a study's saved runs
as `configs/study_gap.md` fixes it (README, "The rank-vs-gap study").

Selection is on validation errors only: r* per task comes from the validation curves (`rank_threshold`),
and the test split is read for the reported numbers (the curves' test errors, the test error at the
validation-chosen r*, the methods' shares of the linear -> full gap). Beside the primary fit: the
per-block evidence (`block_evidence`), the rank benefit with the embedder frozen and trained, the
minimum-of-training check (`method_shares`), and the power of this design at the noise the study
measured (`power`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from orca_lora.files import write_json_atomic
from orca_lora.studies import block_evidence as blocks
from orca_lora.studies.controls import ControlSummary, check_not_mixed, control_summary
from orca_lora.studies.method_shares import (
    MethodShare,
    RankBenefit,
    TrainingCheck,
    method_shares,
    rank_benefits,
    training_checks,
)
from orca_lora.studies.plan import GAIN_FRACTION, rank_benefit_shown, training_met
from orca_lora.studies.power import PowerResult, simulate_power
from orca_lora.studies.rank_threshold import RankLawFit, TaskCurve, fit_threshold_law, smallest_sufficient_rank
from orca_lora.studies.stats.bootstrap import seed_se, seed_standard_error
from orca_lora.studies.study_runs import (
    MissingPoint,
    PlanCheck,
    Regime,
    StudyRun,
    epochs_phrase,
    primary_regime,
    rank_curves,
    rank_sweep,
    seeds_at_every_rank,
    select,
    stacked_test_errors,
)

@dataclass
class RankRow:
    """One (task, rank) of the primary sweep: validation (what selects) and test (what is reported)."""

    task: str
    rank: int
    n_seeds: int
    val_error: float
    val_se: float
    test_error: float
    test_se: float


@dataclass
class ChosenRank:
    """r* chosen on validation, its test error, and the r* the test split would have chosen."""

    task: str
    gap: float
    r_star: int
    test_error: float
    test_se: float
    r_star_on_test: int


@dataclass
class NoiseEstimate:
    """Per task, from the primary sweep (validation): the best error e_best, the un-adapted error's ratio
    e(0) / e_best, the share of the log gain left at the smallest rank, ln(e(r_min) / e_best) / ln(e(0) / e_best),
    and the seed sd of the run means and the per-sample sd, as fractions of each rank's mean error (the power
    simulation's relative noise)."""

    task: str
    best: float
    unadapted_ratio: float
    first_share: float
    seed_sd: float
    sample_sd: float


@dataclass
class IncompleteCurve:
    """A primary rank curve that lacks points of the sweep's plan: analysed on what finished, and said so."""

    task: str
    ranks: list[int]  # the ranks it holds: r* is chosen among these
    lacking_ranks: list[int]  # planned ranks with no run in the curve at all: holes in its grid
    points: list[str]  # the missing points' names


@dataclass
class StudyResult:
    regime: str
    n_runs: int
    n_tasks: int
    gain_fraction: float
    fit: Optional[RankLawFit]
    rank_rows: list[RankRow]
    chosen: list[ChosenRank]
    noise: list[NoiseEstimate]
    power: list[PowerResult]  # beta = 1 and beta = 0 at the study's gaps and measured noise
    power_note: Optional[str] = None  # why there is no power simulation (`power_unavailable`)
    n_at_floor: int = 0  # tasks with a rank sweep whose gap is 0 at every block: left out of the fit
    n_without_reference: int = 0  # tasks with a rank sweep but no rank-0 (`linear`) runs: no r*, left out
    posterior: list[blocks.BlockPoint] = field(default_factory=list)
    one_block: list[blocks.BlockPoint] = field(default_factory=list)
    energy: list[blocks.BlockPoint] = field(default_factory=list)
    trends: list[blocks.BlockTrend] = field(default_factory=list)
    shares: list[MethodShare] = field(default_factory=list)
    benefits: list[RankBenefit] = field(default_factory=list)
    training: list[TrainingCheck] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)  # what the analysis had to do that the plan did not say
    validation_samples: int = 0  # per task (the smallest, if they differ)
    planned_points: int = 0  # in the sweep plans read (0: the directories hold no sweep.json)
    missing: list[MissingPoint] = field(default_factory=list)  # planned points with no finished run
    incomplete: list[IncompleteCurve] = field(default_factory=list)  # fitted curves lacking planned points
    controls: Optional[ControlSummary] = None  # the known-answer (planted) tasks among them
    control_studies: list[ControlStudy] = field(default_factory=list)  # read from their own directories
    verdict: str = ""


@dataclass
class ControlStudy:
    """A known-answer control sweep analysed on its own (`control_studies`), shown beside a study's verdict."""
    directory: str
    result: StudyResult


def rank_rows(runs: Sequence[StudyRun], curves: Sequence[TaskCurve], regime: Regime) -> list[RankRow]:
    rows = []
    for curve in curves:
        # the seeds the curve holds (those run at every rank): test errors over the same seeds as validation
        sweep = rank_sweep(runs, curve.task, regime)
        seeds = seeds_at_every_rank(sweep)
        for index, rank in enumerate(curve.ranks):
            chosen = sorted((run for run in sweep if run.rank == rank and run.seed in seeds), key=lambda run: run.seed)
            per_seed_val = curve.errors[:, index].mean(axis=1)
            tests = stacked_test_errors(chosen)
            rows.append(RankRow(curve.task, int(rank), len(per_seed_val), float(per_seed_val.mean()),
                                float(seed_standard_error(per_seed_val)), float(tests.mean()), seed_se(tests)))
    return rows


def chosen_ranks(runs: Sequence[StudyRun], curves: Sequence[TaskCurve], rows: Sequence[RankRow],
                 regime: Regime) -> list[ChosenRank]:
    """r* on validation (the plan's log-gain rule, from the curve's rank-0 runs) with its test error; beside it
    the rank the same rule picks from the test errors (rank 0's included), to show what choosing on test would
    have changed (it is never used)."""
    chosen = []
    for curve in curves:
        by_rank = {row.rank: row for row in rows if row.task == curve.task}
        r_star = smallest_sufficient_rank(curve.ranks, curve.errors, GAIN_FRACTION, curve.unadapted)
        test_means = np.array([by_rank[int(rank)].test_error for rank in curve.ranks])
        seeds = seeds_at_every_rank(rank_sweep(runs, curve.task, regime))
        unadapted_test = np.mean([run.test_errors.mean() for run in select(runs, curve.task, "linear", regime)
                                  if run.seed in seeds])
        on_test = smallest_sufficient_rank(curve.ranks, test_means[None, :, None], GAIN_FRACTION,
                                           np.full((1, 1), unadapted_test))
        chosen.append(ChosenRank(curve.task, curve.gap, r_star, by_rank[r_star].test_error, by_rank[r_star].test_se,
                                 on_test))
    return chosen


def noise_estimates(curves: Sequence[TaskCurve]) -> list[NoiseEstimate]:
    """The design terms of `power.synthetic_curves` measured on each curve (`NoiseEstimate`); the noise, on the
    errors divided by their rank's mean e(r) (relative, as the simulation draws it): per-sample sd = the sd of
    the relative errors after removing each sample's own difficulty (its mean over seeds and ranks, shared by
    every run and so cancelled by the paired r* rule) and each run's mean; seed sd = the seed-to-seed sd of the
    run means less what that residual contributes (/ sqrt N)."""
    estimates = []
    for curve in curves:
        means = curve.errors.mean(axis=(0, 2))
        errors = curve.errors / means[None, :, None]
        best, unadapted = float(means.min()), float(curve.unadapted.mean())
        log_gain = math.log(unadapted / best) if unadapted > best else math.nan
        residual = errors - errors.mean(axis=(0, 1), keepdims=True) - errors.mean(axis=2, keepdims=True) \
            + errors.mean()
        sample_sd = float(residual.std(ddof=1))
        if errors.shape[0] > 1:
            run_variance = float(np.median(errors.mean(axis=2).var(axis=0, ddof=1)))
            seed_sd = math.sqrt(max(run_variance - sample_sd ** 2 / errors.shape[2], 0.0))
        else:
            seed_sd = math.nan
        estimates.append(NoiseEstimate(curve.task, best, unadapted / best, math.log(means[0] / best) / log_gain,
                                       seed_sd, sample_sd))
    return estimates


def _finite(noise: Sequence[NoiseEstimate]) -> list[NoiseEstimate]:
    """The tasks whose seed and sample noise were both measured (two or more seeds at every rank) and whose
    rank-0 error lies above the best (a log gain to share)."""
    return [n for n in noise if math.isfinite(n.seed_sd) and math.isfinite(n.sample_sd)
            and math.isfinite(n.first_share)]


def power_unavailable(curves: Sequence[TaskCurve], noise: Sequence[NoiseEstimate]) -> Optional[str]:
    """Why `measured_power` cannot simulate this study's design, or None when it can."""
    if len(curves) < 3:
        return f"it needs at least 3 tasks with a positive gap ({len(curves)} here)"
    if len({(tuple(curve.ranks), curve.errors.shape) for curve in curves}) > 1:
        return "it simulates one design, and these tasks differ in rank grid, seeds or validation samples"
    if not _finite(noise):
        return ("it needs a finite measured noise, that is two or more seeds at every rank, on a task whose rank-0 "
                "error lies above its best")
    return None


def measured_power(curves: Sequence[TaskCurve], noise: Sequence[NoiseEstimate], n_studies: int = 100,
                   seed: int = 0) -> list[PowerResult]:
    """The power simulation at this study's gaps, grid, seeds and validation size, with the medians over tasks of
    the measured e(0) / e_best, log-gain share at r_min and relative noise (the plan's amendments of 21:42 and
    22:35; the log-gain rule is invariant to the errors' scale). The share is kept inside the simulation's range
    (f, 1]: a measured share at or below f is a curve whose gain was all had by r_min."""
    if power_unavailable(curves, noise) is not None:
        return []
    usable = _finite(noise)
    first_share = float(np.clip(np.median([n.first_share for n in usable]), GAIN_FRACTION + 1e-3, 1.0))
    design = dict(gaps=np.array([curve.gap for curve in curves]), ranks=tuple(int(r) for r in curves[0].ranks),
                  e_inf=1.0, unadapted_ratio=float(np.median([n.unadapted_ratio for n in usable])),
                  first_share=first_share, seed_sd=float(np.median([n.seed_sd for n in usable])),
                  sample_sd=float(np.median([n.sample_sd for n in usable])),
                  n_samples=int(curves[0].errors.shape[2]), n_seeds=int(curves[0].errors.shape[0]))
    return [simulate_power(beta, n_studies, seed + index, **design) for index, beta in enumerate((1.0, 0.0))]


def evaluate_study(runs: Sequence[StudyRun], n_resamples: int = 999, seed: int = 0,
                   power_studies: int = 100, plan: Optional[PlanCheck] = None) -> StudyResult:
    """Every analysis of the plan on the runs of one study (read with `study_runs.read_study`); `plan`, the
    runs checked against the sweep's plan (`study_runs.check_plan`), names the points that did not finish."""
    regime = primary_regime(runs)
    swept = rank_curves(runs, regime, unadapted=True)  # r* by log gain, measured from the rank-0 runs
    check_not_mixed(runs, swept, regime)
    positive = [curve for curve in swept if curve.gap > 0]
    curves = [curve for curve in positive if curve.unadapted is not None]
    rows = rank_rows(runs, positive, regime)  # every swept curve is shown; r* and the fit need rank 0
    fit = fit_threshold_law(curves, GAIN_FRACTION, n_resamples, seed) if len(curves) >= 3 else None
    noise = noise_estimates(curves)
    result = StudyResult(f"{regime}, {epochs_phrase(runs, regime)}", len(runs), len(curves), GAIN_FRACTION, fit, rows,
                         chosen_ranks(runs, curves, rows, regime), noise,
                         measured_power(curves, noise, power_studies, seed) if power_studies else [])
    result.n_at_floor = len(swept) - len(positive)
    result.n_without_reference = len(positive) - len(curves)
    result.power_note = power_unavailable(curves, noise) if power_studies else "not asked for (0 power studies)"
    result.deviations = [f"{curve.task}: its floor-corrected gap is 0 at every block (at its null), so log2 D is "
                         "undefined and the task is left out of the fit" for curve in swept if curve.gap <= 0]
    result.deviations += [f"{curve.task}: no rank-0 (`linear`) run for every seed of its rank sweep, so its r* (the "
                          "log-gain rule, measured from rank 0) is undefined and the task is left out of the fit: run "
                          "the sweep's `linear` grid" for curve in positive if curve.unadapted is None]
    result.deviations += incomplete_curves(runs, swept, regime)
    result.validation_samples = min((curve.errors.shape[2] for curve in curves), default=0)
    if plan is not None:
        result.planned_points, result.missing = plan.n_planned, list(plan.missing)
        result.incomplete = incomplete_against_plan(curves, plan.missing)
    result.controls = control_summary(runs, swept, regime, fit, GAIN_FRACTION)
    result.posterior = blocks.posterior_points(runs, regime)
    result.one_block = blocks.one_block_points(runs, regime)
    result.energy = blocks.energy_points(runs, regime) if select_any(runs, "full", regime) else []
    posterior_trend = blocks.mixed_model_trend(result.posterior, "ibp-lora posterior rank")
    result.trends = ([posterior_trend] if posterior_trend else []) \
        + blocks.within_task_trends(result.one_block, "one block at rank 1: validation error change") \
        + blocks.within_task_trends(result.energy, "full fine-tuning: energy rank of W - W0")
    result.shares = method_shares(runs, regime, n_resamples, seed)
    regimes = sorted({run.regime for run in runs if run.regime.epoch_multiple == regime.epoch_multiple}, key=str)
    result.benefits = rank_benefits(runs, regimes, n_resamples, seed) if len(regimes) > 1 else []
    result.training = training_checks(runs, regime)
    result.verdict = verdict(result)
    return result


def incomplete_curves(runs: Sequence[StudyRun], curves: Sequence[TaskCurve], regime: Regime) -> list[str]:
    """Seeds a task ran at some ranks but not all: the curve leaves them out."""
    notes = []
    for curve in curves:
        sweep = rank_sweep(runs, curve.task, regime)
        missing = sorted({run.seed for run in sweep} - set(seeds_at_every_rank(sweep)))
        if missing:
            notes.append(f"{curve.task}: seed(s) {missing} lack a rank of the grid and are left out of its curve")
    return notes


def incomplete_against_plan(curves: Sequence[TaskCurve], missing: Sequence[MissingPoint]) -> list[IncompleteCurve]:
    """The curves that lack planned points of the primary sweep: a rank no seed finished is a hole in the
    grid (r* is chosen from the ranks that are there, its censoring interval wider), a rank some seeds
    finished leaves the others out of the curve (`incomplete_curves`)."""
    incomplete = []
    for curve in curves:
        lacking = [point for point in missing if point.primary and point.task == curve.task]
        if lacking:
            ranks = [int(rank) for rank in curve.ranks]
            holes = sorted({point.rank for point in lacking if point.rank is not None} - set(ranks))
            incomplete.append(IncompleteCurve(curve.task, ranks, holes, [point.name for point in lacking]))
    return incomplete


def sweeps_phrase(result: StudyResult) -> str:
    """"4 task(s) with a complete rank sweep", or how many of them lack planned points."""
    floor = f" and a positive gap ({result.n_at_floor} more at the gap floor)" if result.n_at_floor else ""
    if result.n_without_reference:
        floor += f" and rank-0 runs ({result.n_without_reference} more without: run their `linear` points)"
    if not result.incomplete:
        return f"{result.n_tasks} task(s) with a complete rank sweep{floor}"
    names = ", ".join(curve.task for curve in result.incomplete)
    return f"{result.n_tasks} task(s) with a rank sweep, {len(result.incomplete)} of them incomplete ({names})"


def select_any(runs: Sequence[StudyRun], method: str, regime: Regime) -> bool:
    return any(run.method == method and run.regime == regime for run in runs)


def _rho(value: float) -> str:
    return "undefined (r* is the same on every task)" if math.isnan(value) else f"{value:+.2f}"


def _fit_sentence(fit: RankLawFit, n_tasks: int) -> str:
    low, high = fit.slope_interval
    listing = ", ".join(f"{task.task} r*={task.r_star} (D {task.gap:.3g})" for task in sorted(fit.tasks,
                                                                                           key=lambda t: t.gap))
    meaning = {"proportional": "the rank needed grows with the gap, and proportionality (beta = 1) is not rejected",
               "grows": "the rank needed grows with the gap, but not proportionally (beta = 1 is outside the interval)",
               "falls": "the rank needed falls as the gap grows",
               "flat": "the rank needed does not follow the gap (the interval lies inside [-0.5, 0.5])",
               "no evidence": "these runs cannot tell whether the rank needed follows the gap"}[fit.verdict]
    return (f"Verdict: **{fit.verdict}**: {meaning}. Over {n_tasks} tasks, r* chosen on validation ({listing}) "
            f"against the gap gives beta = {fit.slope:.2f}, 95% interval [{low:.2f}, {high:.2f}] "
            f"(p = {fit.p_slope_zero:.3g} for beta = 0, p = {fit.p_slope_one:.3g} for beta = 1); Spearman's rho "
            f"{_rho(fit.spearman_rho)} (one-sided permutation p = {fit.spearman_p:.3g}); leaving one task out, the "
            f"gap predicts log2 r* to within {fit.loto_error_gap:.2f} against {fit.loto_error_no_gap:.2f} without it.")


def flat_tasks(fit: RankLawFit) -> list[str]:
    """The tasks whose rank benefit G is not shown above 0 (the plan's rule, `plan.rank_benefit_shown`)."""
    return [task.task for task in fit.tasks if not rank_benefit_shown(task.rank_benefit_interval)]


def verdict(result: StudyResult) -> str:
    """The verdict sentence, computed from the statistics, with what limits it."""
    if result.fit is None:
        return " ".join([f"No verdict: {sweeps_phrase(result)}; the censored fit needs at least 3 (the plan asks "
                         "for 8).", *_missing_sentences(result)])
    sentences = [_fit_sentence(result.fit, result.n_tasks), *_missing_sentences(result)]
    at_one = next((p for p in result.power if p.beta == 1.0), None)
    at_zero = next((p for p in result.power if p.beta == 0.0), None)
    if at_one and at_zero:
        sentences.append(f"At the noise this study measured, the design declares growth in "
                         f"{at_one.declared_growth:.0%} of simulated studies with a proportional law and in "
                         f"{at_zero.declared_growth:.0%} with none (interval coverage {at_one.coverage:.0%}).")
    flat = flat_tasks(result.fit)
    if flat:
        sentences.append(f"On {len(flat)} of {result.n_tasks} tasks the rank benefit G is not above 0 on validation "
                         f"({', '.join(flat)}): there, r* reads noise, not need.")
    slow = [check for check in result.training if not training_met(check.ratio)]
    if slow:
        sentences.append("The minimum of training is not met ("
                         + ", ".join(f"{c.task} r={c.rank}: {c.study_epochs} epochs {c.study_val:.4f} against "
                                     f"{c.long_epochs} epochs {c.long_val:.4f} on validation" for c in slow)
                         + "): rank here partly measures how fast a rank trains, not what it can hold.")
    return " ".join(sentences)


def _missing_sentences(result: StudyResult) -> list[str]:
    """What the verdict lacks: the planned points that did not finish, and the curves analysed without them."""
    if not result.missing:
        return []
    primary = [point.describe() for point in result.missing if point.primary]
    others = [point.name for point in result.missing if not point.primary]
    listing = "; ".join(primary + ([f"outside the primary sweep: {', '.join(others)}"] if others else []))
    sentences = [f"These runs lack {len(result.missing)} of the sweep's {result.planned_points} planned points: "
                 f"{listing}. Re-run the sweep to fill them (it skips the finished points)."]
    for curve in result.incomplete:
        hole = f" (no run at rank {', '.join(map(str, curve.lacking_ranks))})" if curve.lacking_ranks else ""
        sentences.append(f"The {curve.task} curve is incomplete{hole}: its r* is chosen from ranks "
                         f"{', '.join(map(str, curve.ranks))} over the seeds that finished every one.")
    return sentences


def write_study(result: StudyResult, directory: Path) -> Path:
    """`hypothesis.json` in `directory`: every number of the result, and the verdict, as strict JSON: an
    undefined statistic is null, and so is an unbounded end of an interval (a log2 r* censored at the grid's
    end, whose side says which)."""
    path = Path(directory) / "hypothesis.json"
    write_json_atomic(path, asdict(result))
    return path
