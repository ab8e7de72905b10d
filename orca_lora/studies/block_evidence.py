"""Per-block evidence on rank against the block's gap D_i (README, "The rank-vs-gap study"; plan: configs/study_gap.md):

- IBP-LoRA posterior ranks (flat prior) per block: log2(1 + rank) on log2 D_i with a random intercept
  per task (a linear mixed model, statsmodels MixedLM; Laird & Ware 1982);
- one block at a time: the validation error change when block i drops to rank 1 while the others
  stay at the sweep's rank, Spearman's rho against D_i within each task;
- the energy rank (90% of sum sigma^2) of `full` runs' weight changes W - W0 per block (a cheap proxy
  for the rank each block used), Spearman's rho against D_i within each task.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from orca_lora.run_files import RunFiles
from orca_lora.studies.stats.bootstrap import seed_standard_error
from orca_lora.studies.study_runs import Regime, StudyRun, block_index, block_mean_posterior_ranks, select


@dataclass
class BlockPoint:
    task: str
    block: int
    name: str
    gap: float  # the block's floor-corrected gap, mean over the runs read
    value: float  # what is set against the gap (a rank, an error change)
    se: float  # over seeds (NaN with one)
    n_seeds: int


@dataclass
class BlockTrend:
    what: str
    task: Optional[str]  # None: pooled over tasks (the mixed model)
    statistic: float  # Spearman's rho, or the mixed model's slope
    interval: Optional[tuple[float, float]]  # the slope's 95% Wald interval (mixed model only)
    p_value: float
    n_points: int


def _points(task: str, names: Sequence[str], gaps: np.ndarray, values: np.ndarray) -> list[BlockPoint]:
    """gaps, values: (seeds, blocks)."""
    se = seed_standard_error(values, axis=0)
    return [BlockPoint(task, block, names[block], float(gaps[:, block].mean()), float(values[:, block].mean()),
                       float(se[block]), values.shape[0]) for block in range(values.shape[1])]


def posterior_points(runs: Sequence[StudyRun], regime: Regime) -> list[BlockPoint]:
    """Per task and block, the ibp-lora runs' mean posterior rank over seeds."""
    points = []
    for task in sorted({run.task for run in runs}):
        chosen = [run for run in select(runs, task, "ibp-lora", regime) if run.posterior_ranks]
        if chosen:
            points += _points(task, chosen[0].block_names, np.stack([run.block_gaps for run in chosen]),
                              np.stack([block_mean_posterior_ranks(run) for run in chosen]))
    return points


def mixed_model_trend(points: Sequence[BlockPoint], what: str) -> Optional[BlockTrend]:
    """log2(1 + value) = a + a_task + beta log2 D_i + e (random intercept per task), over the points with
    a positive gap; None when there are fewer than 2 tasks or the values do not vary."""
    import pandas as pd
    import statsmodels.formula.api as smf

    kept = [p for p in points if p.gap > 0]
    frame = pd.DataFrame({"y": [math.log2(1 + p.value) for p in kept], "x": [math.log2(p.gap) for p in kept],
                          "task": [p.task for p in kept]})
    if frame["task"].nunique() < 2 or frame["y"].nunique() < 2 or frame["x"].nunique() < 2:
        return None
    with warnings.catch_warnings():  # a boundary (zero) task variance is reported by the fit, not an error
        warnings.simplefilter("ignore")
        fitted = smf.mixedlm("y ~ x", frame, groups=frame["task"]).fit(reml=True)
    low, high = fitted.conf_int().loc["x"]
    return BlockTrend(what, None, float(fitted.params["x"]), (float(low), float(high)), float(fitted.pvalues["x"]),
                      len(kept))


def one_block_points(runs: Sequence[StudyRun], regime: Regime) -> list[BlockPoint]:
    """Per task and block i: e_val(block i at its rank, the others at r) - e_val(all at r), paired by seed."""
    points = []
    for task in sorted({run.task for run in runs}):
        varied = [run for run in runs if run.task == task and run.block_ranks and run.method == "lora"
                  and run.regime == regime]
        by_block: dict[int, list[float]] = defaultdict(list)
        gaps: dict[int, list[float]] = defaultdict(list)
        names: dict[int, str] = {}
        for run in varied:
            (block, _), = run.block_ranks
            reference = [other for other in select(runs, task, "lora", regime, run.rank, "uniform")
                         if other.seed == run.seed]
            if reference:
                by_block[block].append(run.val_error - reference[0].val_error)
                gaps[block].append(float(reference[0].block_gaps[block]))
                names[block] = run.block_names[block]
        for block in sorted(by_block):
            values = np.array(by_block[block])
            points.append(BlockPoint(task, block, names[block], float(np.mean(gaps[block])), float(values.mean()),
                                     float(seed_standard_error(values)), values.size))
    return points


def energy_points(runs: Sequence[StudyRun], regime: Regime, energy_fraction: float = 0.9) -> list[BlockPoint]:
    """Per task and block, the mean energy rank of the `full` runs' weight changes (orca-lora analyze's
    rank_diagnostic) over the block's modules, then over seeds."""
    from orca_lora.config import read_saved
    from orca_lora.weights.analysis import FrozenWeights, read_run
    from orca_lora.weights.subspace import rank_diagnostic

    frozen, points = FrozenWeights(), []
    for task in sorted({run.task for run in runs}):
        chosen = select(runs, task, "full", regime)
        if not chosen:
            continue
        values = []
        for run in chosen:
            weights = read_run(run.directory, run.directory.name, read_saved(RunFiles(run.directory).config), frozen)
            per_block: dict[int, list[int]] = defaultdict(list)
            for module, change in weights.changes.items():
                rank = rank_diagnostic(change, 1, energy_fraction).energy_rank
                per_block[block_index(module, run.block_names)].append(rank)
            values.append([np.mean(per_block[block]) for block in range(len(run.block_names))])
        points += _points(task, chosen[0].block_names, np.stack([run.block_gaps for run in chosen]),
                          np.array(values, float))
    return points


def within_task_trends(points: Sequence[BlockPoint], what: str) -> list[BlockTrend]:
    """Spearman's rho of value against gap over each task's blocks, with its exact two-sided p-value."""
    trends = []
    for task in sorted({p.task for p in points}):
        chosen = [p for p in points if p.task == task]
        gaps, values = [p.gap for p in chosen], [p.value for p in chosen]
        if len(chosen) < 3 or np.ptp(gaps) == 0 or np.ptp(values) == 0:
            continue
        result = stats.spearmanr(gaps, values)
        trends.append(BlockTrend(what, task, float(result.statistic), None, float(result.pvalue), len(chosen)))
    return trends
