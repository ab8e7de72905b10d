"""Allocations at equal parameter budgets
(README, "Allocations against the field"), from saved run files only (through run_files.py).

Runs are grouped by task, budget and allocation (`stage2.allocation` of the saved config). The budget
is the one the config asked for, not the parameter count a run reached: `stage3.rank` r for uniform
runs and for `stage2.match_uniform_budget` (the cost of uniform rank r), else `stage2.budget`. Reached
counts differ between allocations by rounding (up to one rank-1 component), and by design for adalora
(trained vs final) and posterior ranks, so clustering them by a tolerance would split or merge groups
by accident; the reached counts are reported beside each row instead.

Per group, the learning rate with the lowest mean validation error over seeds is chosen; test errors
are only reported. Each allocation is compared with `uniform` at its own chosen learning rate: a
paired test over test samples (per-sample errors averaged over seeds), Holm-corrected across every
comparison of the table, and the spread of seed-paired differences.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from orca_lora.run_files import RunFiles, read_effective_ranks, read_finished_runs, read_sample_errors
from orca_lora.studies.stats.paired import holm, mean_and_se, paired_sample_test, seed_paired_difference

log = logging.getLogger("orca_lora")

REFERENCE = "uniform"
# may differ inside a (task, budget, allocation) group: the seed, the lr, and a run another point of the
# same seed wrote (ibp-posterior's posterior run is the ibp-lora run of its own seed)
SWEPT = ("seed", "stage3.lr", "stage2.posterior_run")
ALLOCATION_OPTIONS = "stage2."  # the allocation and its own options: differ between allocations of a table


@dataclass(frozen=True, order=True)
class Budget:
    kind: str  # "rank": what uniform stage3.rank costs; "params": stage2.budget
    value: int

    def __str__(self) -> str:
        return f"rank {self.value}" if self.kind == "rank" else f"{self.value} params"


@dataclass
class CompareRun:
    directory: Path
    task: str
    budget: Budget
    allocation: str
    lr: float
    seed: int
    val_error: float
    test_error: float
    adapter_params: int  # sum r_i (d_in + d_out) of the ranks the run trained with
    trainable_params: int  # of the model tested
    trained_params: Optional[int]  # of the model that trained, where it differs (adalora, ibp-lora)
    settings: dict[str, Any]  # the flattened config without the swept and not-compared keys


@dataclass
class Selection:
    """One (task, budget, allocation) at the learning rate chosen on validation."""

    task: str
    budget: Budget
    allocation: str
    lr: float
    val_by_lr: dict[float, float]  # mean validation error over seeds per learning rate
    runs: list[CompareRun]  # the chosen learning rate's runs, one per seed


@dataclass
class CompareRow:
    task: str
    budget: str
    allocation: str
    lr: float
    n_seeds: int
    val_error: float  # mean over seeds at the chosen lr: what selected it
    test_error: float  # mean over seeds
    test_se: float  # standard error over seeds
    adapter_params: int
    trainable_params: int
    trained_params: Optional[int]
    n_test: int
    difference: Optional[float] = None  # vs uniform: mean over test samples of the seed-averaged errors
    p_value: Optional[float] = None  # paired test over test samples
    p_holm: Optional[float] = None  # Holm-adjusted over the table's comparisons
    seed_difference: Optional[float] = None  # mean over seeds of seed-paired differences
    seed_difference_se: Optional[float] = None


@dataclass
class CompareResult:
    paired_test: str
    rows: list[CompareRow]
    selections: list[Selection] = field(default_factory=list)


def run_budget(config: dict[str, Any], path: Path) -> Budget:
    stage2, stage3 = config["stage2"], config["stage3"]
    if stage2["allocation"] == REFERENCE or stage2["match_uniform_budget"]:
        return Budget("rank", int(stage3["rank"]))
    if stage2["budget"] is not None:
        return Budget("params", int(stage2["budget"]))
    raise ValueError(f"{path}: allocation {stage2['allocation']!r} was not given a budget; a comparison at equal "
                     "parameters needs stage2.match_uniform_budget=true or stage2.budget=N")


def read_compare_runs(directories: Sequence[Path], method: str = "lora") -> list[CompareRun]:
    """Every finished run of stage-3 `method` under `directories`, diverged ones left out. Runs of other
    methods (the ibp-lora runs an ibp-posterior allocation reads, full / linear baselines) are skipped:
    allocations are compared on one method."""
    runs = []
    for run in read_finished_runs(directories, method):
        config, metrics = run.config, run.metrics
        settings = {key: value for key, value in run.settings.items() if key not in SWEPT}
        runs.append(CompareRun(
            run.files.root, run.task, run_budget(config, run.files.config), config["stage2"]["allocation"],
            float(config["stage3"]["lr"]), int(config["seed"]), float(metrics.best_val_error),
            float(metrics.test_error), read_effective_ranks(run.files).trainable_params, int(metrics.trainable_params),
            metrics.trained_params, settings))
    return runs


def first_difference(runs: Sequence[Any], exempt: Sequence[str] = ()) -> Optional[tuple[str, Any, Any]]:
    """The first setting (in key order) whose value differs between the first of `runs` and another,
    with those two runs; keys starting with an `exempt` prefix may differ. Runs have `.settings`."""
    first = runs[0]
    for run in runs[1:]:
        for key in sorted(set(first.settings) | set(run.settings)):
            if not key.startswith(tuple(exempt)) and first.settings.get(key) != run.settings.get(key):
                return key, first, run
    return None


def check_same_settings(runs: Sequence[CompareRun], where: str, exempt: str | None = None) -> None:
    """Raise naming the first setting whose value differs between `runs` (keys under `exempt` may)."""
    found = first_difference(runs, () if exempt is None else (exempt,))
    if found is not None:
        key, first, run = found
        raise ValueError(
            f"{where}: setting {key} differs ({first.settings.get(key)!r} in {first.directory}, "
            f"{run.settings.get(key)!r} in {run.directory}); a comparison sweeps only the allocation, "
            f"stage3.lr, seed and the budget: make {key} equal or compare the runs in separate directories")


def select_lr(runs: Sequence[CompareRun]) -> Selection:
    """The learning rate with the lowest mean validation error over its seeds (ties: the smaller lr)."""
    by_lr: dict[float, list[CompareRun]] = defaultdict(list)
    for run in runs:
        by_lr[run.lr].append(run)
    val_by_lr = {lr: float(np.mean([run.val_error for run in group])) for lr, group in sorted(by_lr.items())}
    seed_sets = {lr: sorted(run.seed for run in group) for lr, group in by_lr.items()}
    if len({tuple(seeds) for seeds in seed_sets.values()}) > 1:
        log.warning("%s %s %s: the learning rates were run with different seeds %s; each mean is over its own",
                    runs[0].task, runs[0].budget, runs[0].allocation, seed_sets)
    chosen = min(val_by_lr, key=lambda lr: (val_by_lr[lr], lr))
    seeds = [run.seed for run in by_lr[chosen]]
    if len(seeds) != len(set(seeds)):
        raise ValueError(f"{runs[0].task} {runs[0].budget} {runs[0].allocation} lr {chosen}: seed repeated in "
                         f"{[str(run.directory) for run in by_lr[chosen]]}; give each run directory once")
    first = runs[0]
    return Selection(first.task, first.budget, first.allocation, chosen, val_by_lr,
                     sorted(by_lr[chosen], key=lambda run: run.seed))


def seed_mean_test_errors(selection: Selection) -> np.ndarray:
    """Per-sample test errors averaged over the selection's seeds; every run must hold the same samples."""
    errors = {run.directory: np.asarray(read_sample_errors(RunFiles(run.directory)).test, float)
              for run in selection.runs}
    sizes = {directory: values.shape[0] for directory, values in errors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{selection.task} {selection.allocation}: runs hold different test sets "
                         f"({', '.join(f'{d}: {n} samples' for d, n in sizes.items())}); re-run them on one task.n_test")
    return np.mean(list(errors.values()), axis=0)


def _row(selection: Selection, n_test: int) -> CompareRow:
    test = mean_and_se([run.test_error for run in selection.runs])
    trained = [run.trained_params for run in selection.runs if run.trained_params is not None]
    return CompareRow(
        selection.task, str(selection.budget), selection.allocation, selection.lr, test.n,
        selection.val_by_lr[selection.lr], test.mean, test.se,
        round(np.mean([run.adapter_params for run in selection.runs])),
        round(np.mean([run.trainable_params for run in selection.runs])),
        round(np.mean(trained)) if trained else None, n_test)


def _compare_with_reference(row: CompareRow, selection: Selection, errors: np.ndarray, reference: Selection,
                            reference_errors: np.ndarray, paired_test: str) -> None:
    if errors.shape != reference_errors.shape:
        raise ValueError(f"{selection.task} {selection.budget}: {selection.allocation} runs "
                         f"({selection.runs[0].directory}, ...) have {errors.shape[0]} test samples, uniform runs "
                         f"({reference.runs[0].directory}, ...) {reference_errors.shape[0]}; a paired test needs "
                         "one test set: re-run them with the same task settings")
    paired = paired_sample_test(errors, reference_errors, paired_test)
    row.difference, row.p_value = paired.difference, paired.p_value
    seeds = seed_paired_difference({run.seed: run.test_error for run in selection.runs},
                                   {run.seed: run.test_error for run in reference.runs})
    if seeds is not None:
        row.seed_difference, row.seed_difference_se = seeds.mean, seeds.se


def _table_order(allocation: str) -> tuple[bool, str]:
    return allocation != REFERENCE, allocation


def compare_runs(runs: Sequence[CompareRun], paired_test: str = "t") -> CompareResult:
    """One row per (task, budget, allocation), compared with uniform where the table has it."""
    tables: dict[tuple[str, Budget], dict[str, list[CompareRun]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        tables[(run.task, run.budget)][run.allocation].append(run)
    result = CompareResult(paired_test, [])
    for (task, budget), groups in sorted(tables.items()):
        for allocation, group in groups.items():
            check_same_settings(group, f"task {task}, {budget}, allocation {allocation}")
        check_same_settings([group[0] for group in groups.values()], f"task {task}, {budget}", ALLOCATION_OPTIONS)
        selections = {allocation: select_lr(groups[allocation]) for allocation in sorted(groups, key=_table_order)}
        errors = {allocation: seed_mean_test_errors(selection) for allocation, selection in selections.items()}
        for allocation, selection in selections.items():
            row = _row(selection, errors[allocation].shape[0])
            if allocation != REFERENCE and REFERENCE in selections:
                _compare_with_reference(row, selection, errors[allocation], selections[REFERENCE],
                                        errors[REFERENCE], paired_test)
            result.rows.append(row)
            result.selections.append(selection)
    adjusted = holm([math.nan if row.p_value is None else row.p_value for row in result.rows])
    for row, p_holm in zip(result.rows, adjusted):
        row.p_holm = None if math.isnan(p_holm) else p_holm
    return result


def compare_directory(directory: Path, paired_test: str = "t", method: str = "lora") -> CompareResult:
    return compare_runs(read_compare_runs([directory], method), paired_test)
