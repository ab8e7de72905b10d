"""Sweep tables in the seeds' form (method, rank, trainable params in M, prediction error), read from
saved run files only (through run_files.py): each run's `metrics.json`, `config.yaml` and `gaps.csv`."""
from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from orca_lora.run_files import read_finished_runs, read_gaps

log = logging.getLogger("orca_lora")

@dataclass
class RunRecord:
    directory: Path
    task: str  # task name, plus the settings that tell apart tasks sharing a name
    method: str
    allocation: str  # a stage2.allocation (gap-relative, gap, flat, uniform), explicit, or "-" for full / linear
    rank: int | None  # stage3.rank (None for full / linear)
    seed: int
    test_error: float
    val_error: float  # the best checkpoint's validation error: what model selection may read
    baseline_error: float
    trainable_params: int
    gaps: list[float] | None  # per block, floor-corrected, from stage 2 (None when stage 2 was off)
    block_ranks: list[int] | None


@dataclass
class TableRow:
    task: str
    method: str
    allocation: str
    rank: int | None
    trainable_params_m: float
    error_mean: float
    error_std: float  # sample standard deviation over seeds (NaN for one seed)
    n_seeds: int


def read_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """One record per finished run at or below `paths`; tasks that share a name but differ in settings get
    those settings in their label. Runs with non-finite errors are left out, each named in a warning."""
    records = []
    for run in read_finished_runs(paths):
        metrics = run.metrics
        adapted = metrics.method not in ("full", "linear")
        rows = read_gaps(run.files)
        records.append(RunRecord(
            run.files.root, run.task, metrics.method,
            (metrics.allocation or ("gap-relative" if metrics.gap_aware else "uniform")) if adapted else "-",
            metrics.rank if adapted else None, metrics.seed, float(metrics.test_error),
            float(metrics.best_val_error), float(metrics.baseline_error), int(metrics.trainable_params),
            [row.corrected for row in rows] if rows else None, [row.rank for row in rows] if rows else None))
    return records


def summarize(records: Sequence[RunRecord]) -> list[TableRow]:
    """Mean and standard deviation over seeds per (task, method, allocation, rank)."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[(record.task, record.method, record.allocation, record.rank)].append(record)
    rows = []
    for (task, method, allocation, rank), group in groups.items():
        errors = [record.test_error for record in group]
        rows.append(TableRow(task, method, allocation, rank,
                             statistics.fmean(record.trainable_params for record in group) / 1e6,
                             statistics.fmean(errors), statistics.stdev(errors) if len(errors) > 1 else math.nan,
                             len({record.seed for record in group})))
    return sorted(rows, key=lambda row: (row.task, row.method, row.allocation, row.rank or 0))
