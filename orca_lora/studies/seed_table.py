"""Sweep tables in the seeds' form (method, rank, trainable params in M, prediction error), read from
saved run files only (through run_files.py): each run's `metrics.json`, `config.yaml` and `gaps.csv`."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from orca_lora.files import write_text_atomic
from orca_lora.run_files import METRICS_FILE, RunFiles, RunMetrics, read_gaps, read_metrics

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


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Every finished run directory (one holding metrics.json) at or below the given paths."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory; give run or sweep directories")
        found += [metrics.parent for metrics in sorted(path.rglob(METRICS_FILE))]
    if not found:
        raise FileNotFoundError(f"no finished run (metrics.json) under {', '.join(map(str, paths))}; "
                                "run the sweep first (orca-lora sweep SWEEP.yaml)")
    return found


def diverged(metrics: RunMetrics) -> bool:
    """Non-finite errors: written by versions that let a diverged run finish."""
    return not (math.isfinite(metrics.test_error) and math.isfinite(metrics.best_val_error))


def read_runs(directories: Sequence[Path]) -> list[RunRecord]:
    """One record per run; tasks that share a name but differ in settings get those settings in their label.
    Runs with non-finite errors are left out, each named in a warning."""
    loaded = []
    for directory in directories:
        run = RunFiles(directory)
        if not run.config.is_file():
            raise FileNotFoundError(f"{run.config} is missing; every run directory keeps its resolved config")
        metrics = read_metrics(run)
        if diverged(metrics):
            log.warning("%s: test error %s, best validation error %s: the run diverged; left out (re-run it with "
                        "a lower stage3.lr)", run.metrics, metrics.test_error, metrics.best_val_error)
            continue
        loaded.append((run, metrics, OmegaConf.to_container(OmegaConf.load(run.config))["task"]))
    if not loaded:
        raise ValueError(f"every run found ({len(directories)}) diverged; nothing to tabulate")
    labels = task_labels([task for _, _, task in loaded])
    records = []
    for (run, metrics, _), label in zip(loaded, labels):
        adapted = metrics.method not in ("full", "linear")
        rows = read_gaps(run)
        records.append(RunRecord(
            run.root, label, metrics.method,
            (metrics.allocation or ("gap-relative" if metrics.gap_aware else "uniform")) if adapted else "-",
            metrics.rank if adapted else None, metrics.seed, float(metrics.test_error),
            float(metrics.best_val_error), float(metrics.baseline_error), int(metrics.trainable_params),
            [row.corrected for row in rows] if rows else None, [row.rank for row in rows] if rows else None))
    return records


def task_labels(tasks: Sequence[dict]) -> list[str]:
    by_name: dict[str, list[dict]] = defaultdict(list)
    for task in tasks:
        by_name[task["name"]].append(task)
    differing = {name: sorted(key for key in group[0] if len({json.dumps(t[key]) for t in group}) > 1)
                 for name, group in by_name.items()}
    return [task["name"] + ("(" + ",".join(f"{k}={task[k]}" for k in differing[task["name"]]) + ")"
                            if differing[task["name"]] else "") for task in tasks]


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


COLUMNS = ("task", "method", "allocation", "rank", "trainable_params_M", "prediction_error_mean",
           "prediction_error_std", "n_seeds")


def table_csv(rows: Sequence[TableRow]) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row.task, row.method, row.allocation, "" if row.rank is None else row.rank,
                         f"{row.trainable_params_m:.4f}", f"{row.error_mean:.6g}",
                         "" if math.isnan(row.error_std) else f"{row.error_std:.3g}", row.n_seeds])
    return stream.getvalue()


def _error_cell(row: TableRow) -> str:
    if math.isnan(row.error_std):
        return f"{row.error_mean:.4f} (1 seed)"
    return f"{row.error_mean:.4f} ± {row.error_std:.4f} ({row.n_seeds} seeds)"


def table_markdown(rows: Sequence[TableRow]) -> str:
    lines = ["| task | method | ranks | rank | trainable params (M) | prediction error (↓) |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for row in rows:
        rank = "" if row.rank is None else str(row.rank)
        lines.append(f"| {row.task} | {row.method} | {row.allocation} | {rank} | "
                     f"{row.trainable_params_m:.4f} | {_error_cell(row)} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[TableRow], directory: Path) -> list[Path]:
    """`table.csv` and `table.md` in `directory`."""
    written = [directory / "table.csv", directory / "table.md"]
    write_text_atomic(written[0], table_csv(rows))
    write_text_atomic(written[1], table_markdown(rows))
    return written
