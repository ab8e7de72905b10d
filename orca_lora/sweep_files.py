"""A sweep directory's own files (README, "Sweeps"): `sweep.json`, the plan `orca-lora sweep` writes before any
point runs, read back as `PlannedPoint`s, and each point's `failed.txt`, its one-line reason for failing. The
points' runs are read through run_files.py. No torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from orca_lora.files import write_text_atomic
from orca_lora.run_files import STAGES, RunFiles, diverged, read_json, read_metrics

SWEEP_FILE = "sweep.json"  # in a sweep directory: the sweep's plan, its points and their overrides
FAILURE_FILE = "failed.txt"  # a sweep point's one-line reason for failing: written by the sweep, read by --status


@dataclass(frozen=True)
class PlannedPoint:
    """One point of a sweep's plan (`sweep.json`): its run directory and the overrides that make it."""
    name: str
    directory: Path
    labels: dict[str, str]  # axis -> its part of the point's name
    overrides: tuple[str, ...]  # the point's own key=value overrides (the sweep's `set` applies to every point)

    def override(self, key: str) -> str | None:
        """The value this point sets `key` to, or None when it leaves `key` to the base config."""
        found = [item.split("=", 1)[1] for item in self.overrides if item.split("=", 1)[0] == key]
        return found[-1] if found else None


def read_sweep_plans(paths: Sequence[str | Path]) -> list[list[PlannedPoint]]:
    """The points of every sweep whose plan (`sweep.json`, written by `orca-lora sweep` before any point
    runs) lies at or below `paths`; none for directories that are not sweeps."""
    plans = []
    for path in sorted({plan for path in map(Path, paths) for plan in path.rglob(SWEEP_FILE)}):
        data = read_json(path)
        try:
            plans.append([PlannedPoint(point["name"], path.parent / point["name"], dict(point["labels"]),
                                       tuple(point["overrides"])) for point in data["points"]])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a sweep plan (no {error}); delete it and run the sweep again "
                             "(`orca-lora sweep SWEEP.yaml` rewrites it and skips the finished points)") from None
    return plans


def unfinished(point: PlannedPoint) -> str | None:
    """Why a planned point has no finished run to analyse ("not started", "diverged", ...), or None."""
    run = RunFiles(point.directory)
    if run.is_finished():
        return "diverged" if diverged(read_metrics(run)) else None
    if not run.root.is_dir():
        return "not started"
    failure = read_failure(run)
    if failure is not None:
        return f"failed: {failure}"
    started = [name for name in STAGES if run.marker(name).is_file()]
    where = f"in {started[-1]}" if started else "before stage 1"
    return f"stopped {where}: failed, interrupted or still running"


def write_failure(run: RunFiles, reason: str) -> None:
    """Record why a sweep point failed, on one line (`orca-lora sweep --status` shows it)."""
    write_text_atomic(run.root / FAILURE_FILE, " ".join(reason.split()) + "\n")


def read_failure(run: RunFiles) -> str | None:
    """The point's recorded failure, or None when it has none (never failed, or finished since)."""
    path = run.root / FAILURE_FILE
    return path.read_text().strip() if path.is_file() else None


def clear_failure(run: RunFiles) -> None:
    (run.root / FAILURE_FILE).unlink(missing_ok=True)
