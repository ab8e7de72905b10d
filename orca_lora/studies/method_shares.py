"""Test-split summaries of a study beside full fine-tuning (README, "The rank-vs-gap study"; plan: configs/study_gap.md):
each method's share of the `linear` -> `full` gap, the rank benefit in each embedder regime, and the
minimum-of-training check. Test errors are only reported here; nothing is chosen on them.

Share of the gap (the seeds' tables put every method beside full fine-tuning, Shen et al. 2023):
  share = (e_linear - e_method) / (e_linear - e_full),
0 for the head alone, 1 for full fine-tuning; its interval is a bootstrap over the seeds and test
samples the three share (`paired_bootstrap`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from orca_lora.studies.rank_threshold import relative_benefit
from orca_lora.studies.stats.bootstrap import bootstrap_interval, seed_se
from orca_lora.studies.study_runs import Regime, StudyRun, select, stacked_test_errors


@dataclass
class MethodShare:
    task: str
    method: str  # "lora", "delta-lora", ..., "ibp-lora"
    rank: Optional[int]  # stage3.rank (ibp-lora: its alpha_0)
    seeds: list[int]
    test_error: float  # mean over seeds and test samples
    test_se: float  # over seeds
    share: float
    share_interval: tuple[float, float]
    linear_error: float
    full_error: float


@dataclass
class RankBenefit:
    task: str
    regime: str
    seeds: list[int]
    low_rank: int
    high_rank: int
    low_error: float  # test, mean over seeds
    high_error: float
    benefit: float  # G = (e(low) - e(high)) / e(high)
    benefit_interval: tuple[float, float]


@dataclass
class TrainingCheck:
    task: str
    rank: int
    seeds: list[int]
    study_epochs: int
    long_epochs: int
    study_val: float
    long_val: float
    study_test: float
    long_test: float

    @property
    def ratio(self) -> float:
        """The study's validation error over the long run's (the plan's check: `plan.training_met`; on validation,
        as the pilot reads it, since where training stands decides how r* may be read)."""
        return self.study_val / self.long_val if self.long_val > 0 else math.inf


def _by_seed(runs: Sequence[StudyRun]) -> dict[int, StudyRun]:
    return {run.seed: run for run in runs}


def _paired(*groups: Sequence[StudyRun]) -> tuple[list[int], list[np.ndarray]]:
    """The seeds every group has, and each group's (S, N) test errors over them."""
    by_seed = [_by_seed(group) for group in groups]
    seeds = sorted(set.intersection(*(set(group) for group in by_seed)))
    return seeds, [stacked_test_errors([group[seed] for seed in seeds]) for group in by_seed]


def _share(linear: np.ndarray, full: np.ndarray, method: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (linear - method) / (linear - full)


def method_groups(runs: Sequence[StudyRun], task: str, regime: Regime) -> list[tuple[str, Optional[int], list[StudyRun]]]:
    """Every adapter method's runs of `task` in `regime` (uniform ranks; ibp-lora at any allocation),
    one group per (method, rank)."""
    groups = []
    for method in sorted({run.method for run in runs if run.task == task} - {"linear", "full"}):
        allocation = None if method == "ibp-lora" else "uniform"
        chosen = select(runs, task, method, regime, allocation=allocation)
        for rank in sorted({run.rank for run in chosen}):
            groups.append((method, rank, [run for run in chosen if run.rank == rank]))
    return groups


def method_shares(runs: Sequence[StudyRun], regime: Regime, n_resamples: int = 999,
                  seed: int = 0) -> list[MethodShare]:
    """Per task with linear and full runs in `regime`, every method's share of the linear -> full gap."""
    shares = []
    for task in sorted({run.task for run in runs}):
        linear, full = select(runs, task, "linear", regime), select(runs, task, "full", regime)
        if not linear or not full:
            continue
        for method, rank, group in method_groups(runs, task, regime):
            seeds, (lin, ful, errors) = _paired(linear, full, group)
            if not seeds:
                continue
            share, low, high = bootstrap_interval(_share, [lin, ful, errors], n_resamples, seed)
            shares.append(MethodShare(task, method, rank, seeds, float(errors.mean()), seed_se(errors), share,
                                      (low, high), float(lin.mean()), float(ful.mean())))
    return shares


def rank_benefits(runs: Sequence[StudyRun], regimes: Sequence[Regime], n_resamples: int = 999,
                  seed: int = 0) -> list[RankBenefit]:
    """G on the test split per task and regime, at the lowest and highest rank every regime swept for
    that task, over the seeds all of them ran (so the regimes are compared on the same seeds)."""
    benefits = []
    for task in sorted({run.task for run in runs}):
        curves = {regime: [run for run in select(runs, task, "lora", regime, allocation="uniform") if run.rank]
                  for regime in regimes}
        if sum(bool(curve) for curve in curves.values()) < 2:
            continue
        ranks = set.intersection(*({run.rank for run in curve} for curve in curves.values()))
        if len(ranks) < 2:
            continue
        low_rank, high_rank = min(ranks), max(ranks)
        groups = [[run for run in curve if run.rank == rank] for curve in curves.values()
                  for rank in (low_rank, high_rank)]
        seeds = sorted(set.intersection(*({run.seed for run in group} for group in groups)))
        for regime, curve in curves.items():
            low = [run for run in curve if run.rank == low_rank and run.seed in seeds]
            high = [run for run in curve if run.rank == high_rank and run.seed in seeds]
            _, (low_errors, high_errors) = _paired(low, high)
            value, lo, hi = bootstrap_interval(relative_benefit, [low_errors, high_errors], n_resamples, seed)
            benefits.append(RankBenefit(task, str(regime), seeds, low_rank, high_rank, float(low_errors.mean()),
                                        float(high_errors.mean()), value, (lo, hi)))
    return benefits


def training_checks(runs: Sequence[StudyRun], regime: Regime) -> list[TrainingCheck]:
    """LoRA runs trained longer than `regime` (a larger multiple of their task's sweep epochs, the same
    embedder setting) against the study's runs of the same task, rank and seeds."""
    checks = []
    longer = {run.regime for run in runs if run.regime.train_embedder == regime.train_embedder
              and run.regime.epoch_multiple > regime.epoch_multiple}
    for long_regime in sorted(longer, key=lambda r: r.epoch_multiple):
        for run in runs:
            if run.regime != long_regime or run.method != "lora" or run.allocation != "uniform" or run.block_ranks:
                continue
            studied = [other for other in select(runs, run.task, "lora", regime, run.rank, "uniform")
                       if other.seed == run.seed]
            if studied:
                checks.append(TrainingCheck(run.task, run.rank, [run.seed], studied[0].epochs, run.epochs,
                                            studied[0].val_error, run.val_error, studied[0].test_error,
                                            run.test_error))
    return checks
