"""The regime pilot of the rank-vs-gap study (README, "The rank-vs-gap study"; plan: `configs/study_gap.md`): does
rank bind in a training setting? Read on validation only, from a pilot sweep's saved runs.

Per task and setting (the values of `SETTING_KEYS`, and any other setting in which the pilot's runs differ, such
as the source body), over the seeds that ran both ranks:
- the rank benefit G = (e(r_min) - e(r_max)) / e(r_max), e the mean validation error, with its percentile
  bootstrap interval over seeds and validation samples (paired: one draw applied to both ranks);
- the minimum-of-training check: a run of the setting at rank `CHECK_RANK` against one trained `CHECK_MULTIPLE`
  times as long (the same task, seed and every other setting): e_val(E) / e_val(3E) <= 1.15 (`plan.training_met`);
- the cost: stage-3 seconds per run of the setting (mean; metrics.json's `stage_seconds`).
Rank binds in a setting when G's interval lies above 0 (`plan.rank_benefit_shown`) and the check is met.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from orca_lora.run_files import FinishedRun, read_finished_runs, read_sample_errors
from orca_lora.studies.plan import rank_benefit_shown, training_met
from orca_lora.studies.rank_threshold import relative_benefit
from orca_lora.studies.stats.bootstrap import bootstrap_interval

SETTING_KEYS = ("trainer.max_epochs", "stage3.lr", "stage3.batch_size")
WITHIN_SETTING = ("seed", "stage3.rank")  # what varies among one setting's runs
CHECK_RANK = 8
CHECK_MULTIPLE = 3


@dataclass
class PilotRow:
    task: str  # the task label (task.n_train and other task.* settings that differ are part of it)
    setting: dict[str, Any]  # SETTING_KEYS -> value
    other: dict[str, Any]  # the further settings (not task.*) in which rows differ, such as the source body
    seeds: list[int]
    low_rank: int
    high_rank: int
    low_error: float  # validation, mean over seeds and samples
    high_error: float
    benefit: float  # G
    benefit_interval: tuple[float, float]
    check_ratio: Optional[float]  # e_val at the setting's epochs / at CHECK_MULTIPLE x them, rank CHECK_RANK
    stage3_seconds: float  # mean over the setting's runs

    @property
    def rank_binds(self) -> bool:
        return rank_benefit_shown(self.benefit_interval) and self.check_ratio is not None \
            and training_met(self.check_ratio)


def _setting(run: FinishedRun) -> str:
    """Every setting of the run but its seed and rank (JSON: some values are lists)."""
    settings = run.settings
    missing = [key for key in SETTING_KEYS if key not in settings]
    if missing:
        raise ValueError(f"{run.files.root}: config.yaml lacks {', '.join(missing)}")
    return json.dumps({key: value for key, value in settings.items() if key not in WITHIN_SETTING},
                      sort_keys=True, default=str)


def _other_settings(settings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting, the keys outside SETTING_KEYS and the task's own (in its label) whose values differ."""
    differing = {key for key in set().union(*settings) if len({json.dumps(s.get(key), default=str)
                                                               for s in settings}) > 1}
    shown = sorted(key for key in differing if key not in SETTING_KEYS and not key.startswith("task."))
    return [{key: setting.get(key) for key in shown} for setting in settings]


def _unchanged(run: FinishedRun, other: FinishedRun, epochs: int) -> bool:
    """`other` is `run` trained `epochs` epochs, every other setting equal."""
    mine, theirs = dict(run.settings), dict(other.settings)
    mine["trainer.max_epochs"] = epochs
    return run.task == other.task and mine == theirs


def check_ratio(run: FinishedRun, runs: Sequence[FinishedRun]) -> Optional[float]:
    """e_val(run) / e_val(the same run at CHECK_MULTIPLE x its epochs), or None without that run."""
    longer = CHECK_MULTIPLE * int(run.settings["trainer.max_epochs"])
    match = [other for other in runs if _unchanged(run, other, longer)]
    if not match:
        return None
    return float(run.metrics.best_val_error / match[0].metrics.best_val_error)


def _errors(runs: Sequence[FinishedRun]) -> np.ndarray:
    return np.stack([np.asarray(read_sample_errors(run.files).val, float) for run in runs])


def pilot_rows(runs: Sequence[FinishedRun], n_resamples: int = 999, seed: int = 0) -> list[PilotRow]:
    """One row per (task, setting) whose LoRA runs swept at least two ranks on a common seed."""
    groups: dict[tuple, list[FinishedRun]] = defaultdict(list)
    for run in runs:
        if run.metrics.method == "lora":
            groups[(run.task, _setting(run))].append(run)
    settings = {key: json.loads(key[1]) for key in groups}
    others = dict(zip(settings, _other_settings(list(settings.values())))) if settings else {}
    rows = []
    for (task, setting), group in sorted(groups.items(), key=lambda item: str(item[0])):
        ranks = sorted({run.metrics.rank for run in group})
        by_key = {(run.metrics.rank, run.metrics.seed): run for run in group}
        seeds = sorted({s for r, s in by_key if r == ranks[0]} & {s for r, s in by_key if r == ranks[-1]})
        if len(ranks) < 2 or not seeds:
            continue
        low, high = (_errors([by_key[(rank, s)] for s in seeds]) for rank in (ranks[0], ranks[-1]))
        benefit, lower, upper = bootstrap_interval(relative_benefit, [low, high], n_resamples, seed)
        checks = [check_ratio(run, runs) for run in group if run.metrics.rank == CHECK_RANK]
        ratio = next((value for value in checks if value is not None), None)
        rows.append(PilotRow(task, {key: settings[(task, setting)][key] for key in SETTING_KEYS},
                             others[(task, setting)], seeds, ranks[0], ranks[-1],
                             float(low.mean()), float(high.mean()), benefit, (lower, upper), ratio,
                             float(np.mean([run.metrics.stage_seconds.get("stage3", np.nan) for run in group]))))
    return rows


def pilot_table(directories: Sequence[Path], n_resamples: int = 999, seed: int = 0) -> str:
    """The pilot's Markdown table over every finished run under `directories`."""
    rows = pilot_rows(read_finished_runs(directories), n_resamples, seed)
    if not rows:
        raise ValueError(f"no task under {', '.join(map(str, directories))} has LoRA runs at two ranks on one seed: "
                         "run the pilot sweep (configs/pilot_regime.yaml)")
    lines = ["| task | " + " | ".join(SETTING_KEYS) + " | other settings | seeds | validation e(r_min), e(r_max) | "
             "G [95% interval] | "
             f"check: e(E) / e({CHECK_MULTIPLE}E), r = {CHECK_RANK} | stage 3 s/run | rank binds |",
             "|" + " --- |" * (len(SETTING_KEYS) + 8)]
    for row in rows:
        check = "n/a (no longer run)" if row.check_ratio is None else f"{row.check_ratio:.3f}"
        other = ", ".join(f"{key}={value}" for key, value in row.other.items()) or "-"
        lines.append(f"| {row.task} | " + " | ".join(str(value) for value in row.setting.values())
                     + f" | {other} | {', '.join(map(str, row.seeds))} | {row.low_error:.4g} (r={row.low_rank}), "
                     f"{row.high_error:.4g} (r={row.high_rank}) | {row.benefit:.3f} [{row.benefit_interval[0]:.3f}, "
                     f"{row.benefit_interval[1]:.3f}] | {check} | {row.stage3_seconds:.0f} | "
                     f"{'yes' if row.rank_binds else 'no'} |")
    return "\n".join(lines) + "\n"
