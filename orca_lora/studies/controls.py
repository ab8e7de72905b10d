"""Known-answer controls (README, "Known-answer controls"): does the study's own r* rule find the rank that
a planted task needs?

A `planted-shift` task plants a map of dimension k at the body's entry whose exact LoRA correction on the
embedding projection has rank k (Zeng & Lee 2024, Lemma 1); a `planted-function` task plants a rank-k change
of one Linear of the teacher, with every gap at its floor. Either way r* must be k. Per planted task: r* from
the study's rule on validation (`rank_threshold.smallest_sufficient_rank`: the log-gain rule, measured from the
task's rank-0 runs, `linear`: on the planted tasks' parameter-free head, the frozen body itself), its two-stage
bootstrap percentiles when the law fit drew them; beside it, not fitted, the gain r* (the plan's rule before its
amendment of 21:42: 10% of the gain from the smallest rank), the paired r* (`smallest_unbeaten_rank`) and the
ratio r* (`smallest_level_rank`); the block-0 gap D_0 (where the plant is) and the mean gap the study fits on.
Across tasks, the planted law is r* = k; against the measured gap that is
the elasticity of k in D (least squares of log2 k on log2 D over the tasks), the beta the fit should
find if the gaps track k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from orca_lora.choices import PLANTED_TASKS
from orca_lora.studies.rank_threshold import (RankLawFit, TaskCurve, smallest_level_rank, smallest_sufficient_rank,
                                              smallest_unbeaten_rank)
from orca_lora.studies.study_runs import Regime, StudyRun, rank_sweep



@dataclass
class ControlRow:
    task: str
    planted_k: int
    r_star: Optional[int]  # the study's rule on validation: 10% of the log gain from rank 0 (None without rank 0)
    gain_r_star: int  # 10% of the gain from the smallest rank (validation; the plan's rule before 21:42)
    paired_r_star: int  # the smallest rank not worse than the best by a paired test (validation; plan amendment)
    ratio_r_star: int  # the smallest rank within 15% of the best error (validation; plan amendment)
    unadapted_error: Optional[float]  # e(0), validation, mean over the rank-0 runs
    r_star_percentiles: Optional[tuple[float, float]]  # the law fit's bootstrap (None without a fit)
    fraction_at_k: Optional[float]  # bootstrap replicates choosing r* = k
    block0_gap: float  # floor-corrected D at block 0, mean over the runs
    mean_gap: float  # the gap the study fits on: the mean over blocks
    ranks: list[int]
    mean_errors: list[float]  # e(r), validation

    @property
    def recovered(self) -> bool:
        return self.r_star == self.planted_k


@dataclass
class ControlSummary:
    rows: list[ControlRow]
    recovered: int  # tasks with r* = k
    planted_elasticity: Optional[float]  # slope of log2 k on log2 mean D (None: < 2 distinct gaps)
    block0_elasticity: Optional[float]  # the same against D_0
    gaps_increase_with_k: Optional[bool]  # mean D strictly increasing in k (None: one k for every task, a null)
    gaps_at_floor: bool  # every task's mean D is 0 (a function control): no fit can attribute r* to the gap
    requirement: str = ""  # what the plan requires of this kind of control (`judge_control`)
    passed: Optional[bool] = None  # None: it cannot be judged (a null without a fit)


def planted_rank(run: StudyRun) -> Optional[int]:
    """task.planted_k of a planted task's run; None for any other task."""
    if run.settings.get("task.name") not in PLANTED_TASKS:
        return None
    return int(run.settings["task.planted_k"])


def check_not_mixed(runs: Sequence[StudyRun], curves: Sequence[TaskCurve], regime: Regime) -> None:
    """Planted and natural tasks are never fitted together: a control's law would pass for the study's."""
    planted = {curve.task for curve in curves if any(planted_rank(run) is not None
                                                     for run in rank_sweep(runs, curve.task, regime))}
    natural = sorted({curve.task for curve in curves} - planted)
    if planted and natural:
        raise ValueError(f"the directories hold planted tasks ({', '.join(sorted(planted))}) and natural ones "
                         f"({', '.join(natural)}): give the controls' directories with --controls, so each is "
                         "analysed apart from the study")


def _elasticity(gaps: np.ndarray, k: np.ndarray) -> Optional[float]:
    if len(np.unique(gaps)) < 2 or np.any(gaps <= 0):
        return None
    return float(np.polyfit(np.log2(gaps), np.log2(k), 1)[0])


def control_summary(runs: Sequence[StudyRun], curves: Sequence[TaskCurve], regime: Regime,
                    fit: Optional[RankLawFit], gain_fraction: float) -> Optional[ControlSummary]:
    """The planted tasks among `curves` (one row each, by planted k), or None when there are none; a curve's
    rank-0 runs (`unadapted`) give its r* (none without them)."""
    fitted = {task.task: task for task in fit.tasks} if fit is not None else {}
    rows = []
    for curve in curves:
        sweep = rank_sweep(runs, curve.task, regime)
        planted = {planted_rank(run) for run in sweep}
        if planted == {None} or not sweep:
            continue
        if len(planted) != 1:
            raise ValueError(f"task {curve.task}: its runs plant different k {sorted(planted, key=str)}; give each "
                             "task.planted_k its own task label")
        k = planted.pop()
        chosen = fitted.get(curve.task)
        reference = curve.unadapted
        r_star = None if reference is None else smallest_sufficient_rank(curve.ranks, curve.errors, gain_fraction,
                                                                         reference)
        rows.append(ControlRow(
            curve.task, k, r_star, smallest_sufficient_rank(curve.ranks, curve.errors, gain_fraction),
            smallest_unbeaten_rank(curve.ranks, curve.errors), smallest_level_rank(curve.ranks, curve.errors),
            None if reference is None else float(reference.mean()),
            None if chosen is None else chosen.r_star_percentiles,
            None if chosen is None else chosen.r_star_fractions.get(k, 0.0),
            float(np.mean([run.block_gaps[0] for run in sweep])), float(curve.gap),
            [int(r) for r in curve.ranks], [float(e) for e in curve.errors.mean(axis=(0, 2))]))
    if not rows:
        return None
    rows.sort(key=lambda row: (row.planted_k, row.task))
    k = np.array([row.planted_k for row in rows], dtype=float)
    mean_gaps = np.array([row.mean_gap for row in rows])
    if len(set(k)) == 1:
        increasing = None
    else:
        increasing = len(set(k)) == len(k) and bool(np.all(np.diff(mean_gaps) > 0))
    summary = ControlSummary(rows, sum(row.recovered for row in rows), _elasticity(mean_gaps, k),
                             _elasticity(np.array([row.block0_gap for row in rows]), k), increasing,
                             bool(np.all(mean_gaps == 0)))
    summary.requirement, summary.passed = judge_control(summary, fit)
    return summary


def judge_control(summary: ControlSummary, fit: Optional[RankLawFit]) -> tuple[str, Optional[bool]]:
    """The plan's pass criterion for this kind of control (`configs/study_gap.md`, "Known-answer controls")
    and whether it is met: a function control (every gap at its floor) needs r* = k everywhere and no fit; a
    null (one k, the gap moving) needs beta's interval to hold 0 and a verdict other than "grows" or
    "proportional"; a law needs r* = k everywhere and the verdict "proportional"."""
    everywhere = summary.recovered == len(summary.rows)
    if summary.gaps_at_floor:
        return "r* = k on every task and no fit (every gap at its floor)", everywhere and fit is None
    if summary.gaps_increase_with_k is None:
        requirement = "beta's interval holds 0 and the verdict is neither \"grows\" nor \"proportional\""
        if fit is None:
            return requirement, None
        low, high = fit.slope_interval
        return requirement, low <= 0 <= high and fit.verdict not in ("grows", "proportional")
    return "r* = k on every task and the verdict \"proportional\"", everywhere and fit is not None and \
        fit.verdict == "proportional"
