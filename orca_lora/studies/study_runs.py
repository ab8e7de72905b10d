"""A study's finished runs, read from saved run files only (metrics.json, config.yaml, gaps.csv,
stage3/sample_errors.npz), and grouped into the curves the rank-vs-gap analysis reads (README, "The rank-vs-gap study").

A sweep's plan (`sweep.json`) says which runs should be there: `check_plan` names the planned points
without a finished run, each with the curve it belongs to.

A curve is one (task, method, allocation, regime, block ranks): its runs may differ only in `seed`
and `stage3.rank`; every other setting must agree, or reading fails naming the setting. Within a
task, every run must agree on everything but the design's own axes (the stage-3 settings, the
allocation and its options, the epochs and the seed), so that linear, LoRA and full runs of a task
share their data, source and stage 1.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from orca_lora.run_files import FinishedRun, module_block, read_finished_runs, read_gaps, read_sample_errors
from orca_lora.studies.compare import first_difference
from orca_lora.studies.rank_threshold import TaskCurve
from orca_lora.sweep_files import PlannedPoint, read_sweep_plans, unfinished

log = logging.getLogger("orca_lora")

CURVE_SWEPT = ("seed", "stage3.rank")  # what may differ inside a curve
# may differ inside a task: the allocations' own options (stage2.*) too; the gap is read from the primary
# curve, whose runs share their stage-2 settings
DESIGN_PREFIXES = ("seed", "stage3.", "stage2.", "trainer.max_epochs")
NO_RANK_METHODS = ("linear", "full")
# task.* settings that make another task of the same family, not the same task with other data sizes
TASK_DIALS = ("noise", "permute_fraction", "tile", "wavenumber", "time", "planted_k", "planted_angle")


@dataclass(frozen=True)
class Regime:
    """How a run trained, relative to its task: the embedder trained or frozen, and its epochs as a multiple
    of its task's sweep epochs (the fewest any uniform LoRA run of the task trained: `relative_regimes`). Tasks
    whose training was sized one by one (configs/controls.yaml) share a regime; a check trained 3x as long as
    its task's sweep has its own."""
    train_embedder: bool
    epoch_multiple: float = 1.0

    def __str__(self) -> str:
        embedder = "trained embedder" if self.train_embedder else "frozen embedder"
        return embedder if self.epoch_multiple == 1 else f"{embedder}, {self.epoch_multiple:g}x the sweep's epochs"


@dataclass
class StudyRun:
    directory: Path
    task: str
    method: str
    allocation: str
    rank: Optional[int]  # stage3.rank; 0 for linear (rank 0: head only), None for full
    seed: int
    regime: Regime
    epochs: int  # trainer.max_epochs
    block_ranks: tuple[tuple[int, int], ...]  # stage3.block_ranks, sorted
    val_errors: np.ndarray  # per validation sample, of the checkpoint chosen on validation
    test_errors: np.ndarray  # per test sample, of that checkpoint
    block_gaps: Optional[np.ndarray]  # floor-corrected gap per block (None: stage 2 off)
    block_names: tuple[str, ...]
    posterior_ranks: Optional[dict[str, int]]  # ibp-lora: module -> posterior rank
    trainable_params: int
    settings: dict[str, Any]  # flattened config without where-its-files-live keys

    @property
    def curve(self) -> tuple:
        return self.task, self.method, self.allocation, self.regime, self.block_ranks

    @property
    def val_error(self) -> float:
        return float(self.val_errors.mean())

    @property
    def test_error(self) -> float:
        return float(self.test_errors.mean())

    @property
    def mean_gap(self) -> float:
        return float(np.mean(self.block_gaps))


def _read_one(run: FinishedRun) -> StudyRun:
    config, metrics = run.config, run.metrics
    samples = read_sample_errors(run.files)
    rows = read_gaps(run.files)
    stage3 = config["stage3"]
    rank = 0 if metrics.method == "linear" else None if metrics.method == "full" else int(stage3["rank"])
    return StudyRun(
        run.files.root, run.task, metrics.method, config["stage2"]["allocation"], rank, int(config["seed"]),
        Regime(bool(stage3["train_embedder"])), int(config["trainer"]["max_epochs"]),
        tuple(sorted((int(k), int(v)) for k, v in (stage3.get("block_ranks") or {}).items())),
        np.asarray(samples.val, float), np.asarray(samples.test, float),
        np.array([row.corrected for row in rows]) if rows else None,
        tuple(row.name for row in rows) if rows else (), metrics.posterior_ranks, int(metrics.trainable_params),
        run.settings)


def read_study(directories: Sequence[Path]) -> list[StudyRun]:
    """Every finished run under `directories` (diverged ones left out, each named), checked for
    settings that differ where they must not."""
    finished = read_finished_runs(directories)
    for run in finished:
        if not run.files.sample_errors.is_file():
            raise FileNotFoundError(f"{run.files.sample_errors} is missing: the run was written by a version that did "
                                    "not save per-sample errors; delete its stage3/ folder and run it again")
    runs = relative_regimes([_read_one(run) for run in finished])
    check_groups(runs)
    return runs


def relative_regimes(runs: Sequence[StudyRun]) -> list[StudyRun]:
    """The runs with each regime's epochs as a multiple of its task's sweep epochs: the fewest epochs of the
    task's uniform LoRA runs (of all its runs when it has none)."""
    sweep_epochs: dict[str, int] = {}
    for task in {run.task for run in runs}:
        own = [run for run in runs if run.task == task]
        swept = [run.epochs for run in own if _is_uniform_lora(run)] or [run.epochs for run in own]
        sweep_epochs[task] = min(swept)
    return [replace(run, regime=Regime(run.regime.train_embedder, run.epochs / sweep_epochs[run.task]))
            for run in runs]


def epochs_phrase(runs: Sequence[StudyRun], regime: Regime) -> str:
    """`20 epochs`, or `epochs by task: a 20, b 60` when the regime's tasks trained for different lengths."""
    by_task = {run.task: run.epochs for run in runs if run.regime == regime}
    if len(set(by_task.values())) <= 1:
        return f"{next(iter(by_task.values()), 0)} epochs"
    return "epochs by task: " + ", ".join(f"{task} {epochs}" for task, epochs in sorted(by_task.items()))


@dataclass
class MissingPoint:
    """A point of the sweep's plan with no finished run to analyse. Its curve is that of a finished point
    of the plan whose overrides differ from its own in seed and stage3.rank only (unknown without one)."""
    name: str
    directory: str
    state: str  # `sweep_files.unfinished`: not started, diverged, stopped in a stage
    rank: Optional[int]  # as the point sets it (None: the base config's, unknown here)
    seed: Optional[int]
    task: Optional[str] = None
    method: Optional[str] = None
    primary: bool = False  # in a rank curve of the primary sweep (uniform LoRA in the primary regime)

    def describe(self) -> str:
        """`darcy_rank4_seed0 (darcy, lora, rank 4, seed 0; diverged)`."""
        parts = (self.task, self.method, None if self.rank is None else f"rank {self.rank}",
                 None if self.seed is None else f"seed {self.seed}")
        where = ", ".join(part for part in parts if part)
        return f"{self.name} ({where + '; ' if where else ''}{self.state})"


@dataclass
class PlanCheck:
    """The runs against the sweep plans under the study's directories (none: not a sweep)."""
    n_planned: int
    missing: list[MissingPoint]


def check_plan(directories: Sequence[Path], runs: Sequence[StudyRun]) -> PlanCheck:
    """Every point of the sweep plans under `directories` (`sweep_files.read_sweep_plans`) that `runs` lack."""
    plans = read_sweep_plans(directories)
    return PlanCheck(sum(map(len, plans)), missing_points(plans, runs))


def missing_points(plans: Sequence[Sequence[PlannedPoint]], runs: Sequence[StudyRun]) -> list[MissingPoint]:
    """The planned points `runs` lack, each with why (`sweep_files.unfinished`) and, from a finished sibling
    point (`_curve_key`), the curve it would have joined."""
    read = {Path(run.directory).resolve(): run for run in runs}
    primary = primary_regime(runs) if any(_is_uniform_lora(run) for run in runs) else None
    missing = []
    for plan in plans:
        finished = [(point, read[point.directory.resolve()]) for point in plan if point.directory.resolve() in read]
        for point in plan:
            if point.directory.resolve() in read:
                continue
            state = unfinished(point) or "finished, but not read (written after the analysis started)"
            rank, seed = point.override("stage3.rank"), point.override("seed")
            entry = MissingPoint(point.name, str(point.directory), state, _integer(rank), _integer(seed))
            sibling = next((run for other, run in finished if _curve_key(other) == _curve_key(point)), None)
            if sibling is not None:
                entry.task, entry.method = sibling.task, sibling.method
                entry.rank = sibling.rank if entry.rank is None else entry.rank
                entry.seed = sibling.seed if entry.seed is None else entry.seed
                entry.primary = _is_uniform_lora(sibling) and sibling.regime == primary
            missing.append(entry)
    return missing


def _curve_key(point: PlannedPoint) -> tuple[str, ...]:
    """A planned point's overrides less those that may differ inside one curve (CURVE_SWEPT)."""
    return tuple(sorted(item for item in point.overrides if item.split("=", 1)[0] not in CURVE_SWEPT))


def _integer(value: Optional[str]) -> Optional[int]:
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def _is_uniform_lora(run: StudyRun) -> bool:
    return run.method == "lora" and run.allocation == "uniform" and not run.block_ranks


def _task_identity(run: StudyRun) -> tuple:
    """A task's name and the dials that make it another task of its family (planted k, noise level)."""
    return (run.settings.get("task.name", run.task), *(run.settings.get(f"task.{dial}") for dial in TASK_DIALS))


def check_groups(runs: Sequence[StudyRun]) -> None:
    """Raise naming the first setting that differs inside a curve, or inside a task outside the design's axes."""
    checks = ((lambda run: run.curve, CURVE_SWEPT, "inside one curve only seed and stage3.rank may differ"),
              # by task name and dials, not label: a label splits a name by all its task.* settings
              # (task_labels), which would hide e.g. linear runs with another task.n_train than the LoRA runs
              # of the same task
              (_task_identity, DESIGN_PREFIXES,
               "inside one task only seed, stage3.*, stage2.* and trainer.max_epochs may differ"))
    for key_of, exempt, rule in checks:
        groups: dict[Any, list[StudyRun]] = defaultdict(list)
        for run in runs:
            groups[key_of(run)].append(run)
        for group in groups.values():
            found = first_difference(group, exempt)
            if found is not None:
                key, a, b = found
                raise ValueError(f"setting {key} differs ({a.settings.get(key)!r} in {a.directory}, "
                                 f"{b.settings.get(key)!r} in {b.directory}): {rule}; make {key} equal, or "
                                 "analyse the runs in separate directories")


def primary_regime(runs: Sequence[StudyRun]) -> Regime:
    """The regime of the main rank sweep: the one with the most uniform LoRA runs."""
    counts: dict[Regime, int] = defaultdict(int)
    for run in runs:
        if _is_uniform_lora(run):
            counts[run.regime] += 1
    if not counts:
        raise ValueError("no uniform LoRA runs (stage3.method=lora, stage2.allocation=uniform) to sweep ranks from")
    return max(counts, key=lambda regime: (counts[regime], not regime.train_embedder))


def select(runs: Sequence[StudyRun], task: str, method: str, regime: Regime, rank: Optional[int] = None,
           allocation: Optional[str] = None, block_ranks: tuple = ()) -> list[StudyRun]:
    """The runs of one curve (at one rank if given), sorted by seed."""
    chosen = [run for run in runs if run.task == task and run.method == method and run.regime == regime
              and run.block_ranks == block_ranks and (rank is None or run.rank == rank)
              and (allocation is None or run.allocation == allocation)]
    return sorted(chosen, key=lambda run: run.seed)


def rank_sweep(runs: Sequence[StudyRun], task: str, regime: Regime, method: str = "lora") -> list[StudyRun]:
    """The uniform-rank runs of `method` (rank > 0) of one task in `regime`."""
    return [run for run in select(runs, task, method, regime, allocation="uniform") if run.rank]


def seeds_at_every_rank(sweep: Sequence[StudyRun]) -> list[int]:
    """The seeds a rank sweep ran at every one of its ranks: the ones its curve holds."""
    ranks = {run.rank for run in sweep}
    return sorted(set.intersection(*({run.seed for run in sweep if run.rank == r} for r in ranks))) if ranks else []


def rank_curves(runs: Sequence[StudyRun], regime: Regime, method: str = "lora",
                seeds: Optional[Sequence[int]] = None, unadapted: bool = False) -> list[TaskCurve]:
    """Per task, the uniform `method` runs of `regime` as a TaskCurve: validation errors (S, R, N) over
    the seeds present at every rank (restricted to `seeds` if given); the gap is the mean over those
    runs of the block-mean floor-corrected gap. Tasks with fewer than 2 ranks are left out. `unadapted`:
    the task's `linear` runs (rank 0) of those seeds as the curve's reference, where it has one for every
    seed (r* is then the log-gain rule's)."""
    curves = []
    for task in sorted({run.task for run in runs}):
        sweep = rank_sweep(runs, task, regime, method)
        ranks = sorted({run.rank for run in sweep})
        by_key = {(run.seed, run.rank): run for run in sweep}
        common = seeds_at_every_rank(sweep)
        if seeds is not None:
            common = [seed for seed in common if seed in seeds]
        if len(ranks) < 2 or not common:
            continue
        chosen = [by_key[(seed, rank)] for seed in common for rank in ranks]
        if any(run.block_gaps is None for run in chosen):
            raise ValueError(f"task {task}: a run has no gaps.csv; keep stage2.enabled=true (allocation uniform)")
        errors = np.stack([np.stack([by_key[(seed, rank)].val_errors for rank in ranks]) for seed in common])
        linear = {run.seed: run.val_errors for run in select(runs, task, "linear", regime)}
        reference = np.stack([linear[seed] for seed in common]) if unadapted and set(common) <= set(linear) else None
        curves.append(TaskCurve(task, float(np.mean([run.mean_gap for run in chosen])), np.array(ranks), errors,
                                reference))
    return curves


def stacked_test_errors(runs: Sequence[StudyRun]) -> np.ndarray:
    """(S, N_test) per-sample test errors of the runs, one row per run."""
    return np.stack([run.test_errors for run in runs])


def block_index(module: str, block_names: Sequence[str]) -> int:
    """`run_files.module_block`, an error naming the module when no block holds it."""
    index = module_block(module, block_names)
    if index is None:
        raise ValueError(f"module {module} lies in none of the blocks {list(block_names)} of gaps.csv")
    return index


def block_mean_posterior_ranks(run: StudyRun) -> np.ndarray:
    """Per block, the mean over its modules of an ibp-lora run's posterior rank."""
    if not run.posterior_ranks:
        raise ValueError(f"{run.directory}: no posterior ranks in metrics.json (not an ibp-lora run)")
    per_block: dict[int, list[int]] = defaultdict(list)
    for module, rank in run.posterior_ranks.items():
        per_block[block_index(module, run.block_names)].append(rank)
    return np.array([np.mean(per_block[index]) for index in range(len(run.block_names))])


def describe(runs: Sequence[StudyRun]) -> str:
    """One line per curve: the seeds and ranks it holds (for the report's inventory)."""
    groups: dict[tuple, list[StudyRun]] = defaultdict(list)
    for run in runs:
        groups[run.curve].append(run)
    lines = []
    for (task, method, allocation, regime, blocks), group in sorted(groups.items(), key=lambda item: str(item[0])):
        ranks = sorted({run.rank for run in group if run.rank is not None})
        epochs = sorted({run.epochs for run in group})
        lines.append(f"{task} {method} {allocation} ({regime}, {'/'.join(map(str, epochs))} epochs"
                     f"{', blocks ' + json.dumps(dict(blocks)) if blocks else ''}): "
                     f"{len(group)} runs, seeds {sorted({run.seed for run in group})}"
                     + (f", ranks {ranks}" if ranks else ""))
    return "\n".join(lines)
