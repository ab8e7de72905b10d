"""`orca-lora calibrate DIR...`: the rank law P(r | D) fitted on finished IBP-LoRA runs (README, "P(r | D)").

Reads each run's files only (config.yaml, stage2/gaps.csv, metrics.json). One observation per
(task, block): the block's rank is the median (the lower one for an even count) of its modules'
posterior ranks, censored when it reaches the median of their truncations r_max; its gap is the
block's floor-corrected gap in floor units (`rank/law.floor_units`). Runs of one task with several
training seeds give one observation per block, the median over the seeds, so that a task's blocks
are not counted once per seed. Every run must share the body, proxy set, distance and held-out
sample size (`LawProvenance`); a mix is an error naming the setting.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from orca_lora.config import read_saved, section_hash
from orca_lora.rank.law import RankObservation, fit_rank_law, floor_units
from orca_lora.rank.law_file import LawFile, LawProvenance, write_law_file
from orca_lora.run_files import RunFiles, find_runs, module_block, read_gaps, read_metrics

LAW_FILE = "rank_law.json"


def block_observations(run: RunFiles, task: str) -> list[RankObservation]:
    """One observation per block of one ibp-lora run."""
    metrics = read_metrics(run)
    if metrics.posterior_ranks is None or metrics.posterior_caps is None:
        raise ValueError(f"{run.metrics} has no posterior ranks (method {metrics.method}); calibrate reads "
                         "runs of stage3.method=ibp-lora")
    rows = read_gaps(run)
    if not rows:
        raise ValueError(f"{run.gaps} is missing or empty: calibrate needs stage 2's gaps (stage2.enabled true)")
    names = [row.name for row in rows]
    observations = []
    for index, row in enumerate(rows):
        modules = [name for name in metrics.posterior_ranks if module_block(name, names) == index]
        if not modules:
            continue
        rank = statistics.median_low(metrics.posterior_ranks[name] for name in modules)
        cap = statistics.median_low(metrics.posterior_caps[name] for name in modules)
        observations.append(RankObservation(task, row.name, floor_units(row.corrected, row.floor), int(rank), int(cap)))
    return observations


def calibrate(directories: Sequence[Path | str], output: Path | None = None) -> LawFile:
    """Fit the law on every finished run under `directories`; write it to `output` (default
    `<first directory>/rank_law.json`)."""
    runs = [RunFiles(path) for path in find_runs(directories)]
    provenance, per_task = None, defaultdict(list)
    for run in runs:
        config = read_saved(run.config)
        here = LawProvenance.of(config)
        if provenance is None:
            provenance = here
        elif here != provenance:
            differing = [name for name in vars(here) if getattr(here, name) != getattr(provenance, name)]
            raise ValueError(f"{run.root} differs from the first run in {', '.join(differing)}: a law is fitted "
                             "on one body, proxy set, distance and sample size; calibrate those runs apart")
        per_task[(config.task.name, section_hash(config, "task"))].append(block_observations(run, config.task.name))
    names = Counter(name for name, _ in per_task)
    observations = []
    for (name, task_hash), runs_of_task in sorted(per_task.items()):
        label = name if names[name] == 1 else f"{name}@{task_hash}"
        observations += _median_over_seeds(label, runs_of_task)
    law_file = LawFile(fit_rank_law(observations), provenance, observations, [str(run.root) for run in runs])
    write_law_file(Path(output) if output else Path(directories[0]) / LAW_FILE, law_file)
    return law_file


def _median_over_seeds(task: str, runs: list[list[RankObservation]]) -> list[RankObservation]:
    by_block = defaultdict(list)
    for observations in runs:
        for o in observations:
            by_block[o.block].append(o)
    return [RankObservation(task, block, statistics.median_low(o.x for o in group),
                            statistics.median_low(o.rank for o in group), min(o.cap for o in group))
            for block, group in by_block.items()]


def format_law(law_file: LawFile) -> str:
    law, p = law_file.law, law_file.provenance
    lines = [f"rank law r ~ Poisson(c x^beta), x = 1 + corrected gap / floor ({p.distance} gaps, "
             f"{law.n_observations} (task, block) observations from {law.n_tasks} tasks, {law.n_censored} censored)",
             f"  beta = {law.beta:.3f}, 95% profile interval [{law.beta_low:.3f}, {law.beta_high:.3f}]; c = {law.c:.3f}",
             f"  likelihood-ratio tests: beta = 0 p = {law.p_beta_0:.3g}; beta = 1 p = {law.p_beta_1:.3g}",
             f"  leave-one-task-out mean |rank error| = {law.leave_one_task_out_error:.2f}",
             "", f"{'task':<24} {'block':<20} {'x':>8} {'rank':>5} {'cap':>4}"]
    lines += [f"{o.task:<24} {o.block:<20} {o.x:>8.3g} {o.rank:>5} {o.cap:>4}{' (censored)' if o.censored else ''}"
              for o in law_file.observations]
    if law.n_tasks < 8:
        lines.append(f"\n{law.n_tasks} tasks: blocks of one task share its embedder and data, so they are not "
                     "independent; read beta as a description, not evidence, below about 8 tasks")
    return "\n".join(lines)
