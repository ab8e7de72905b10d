"""`orca-lora sweep FILE --status` (README, "Sweeps on a cluster"): where each point of a sweep stands,
read from its run directory alone, so it answers for either launcher, during or after a sweep, from any
machine that sees the files:

- finished: metrics.json, written with the point's config;
- running: a live process holds its run.lock (host, pid, since when);
- failed: its failed.txt, the one-line reason the sweep recorded;
- interrupted: started (a stage marker, or a run.log) but none of the above: the next launch resumes it;
- not started: nothing yet, or a run finished with another config (the next launch redoes it).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from orca_lora.run_files import STAGES, RunFiles
from orca_lora.run_lock import lock_holder
from orca_lora.sweep_files import read_failure
from orca_lora.sweeps.sweep import Sweep, SweepPoint, is_finished
from orca_lora.sweeps.workers import RUN_LOG

STATES = ("finished", "running", "failed", "interrupted", "not started")


@dataclass(frozen=True)
class PointStatus:
    name: str
    state: str  # one of STATES
    detail: str = ""  # running: host, pid, since; failed: the reason; interrupted: where it stopped


def point_status(sweep: Sweep, point: SweepPoint) -> PointStatus:
    run = RunFiles(sweep.directory / point.name)
    holder = lock_holder(run)
    if holder is not None:  # first: a run finished or failed earlier may be running again
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return PointStatus(point.name, "running", f"host {holder.get('host')}, pid {holder.get('pid')}, "
                                                  f"since {since}")
    if run.is_finished():
        if is_finished(sweep, point):
            return PointStatus(point.name, "finished")
        return PointStatus(point.name, "not started", "finished with another config: the next launch redoes it")
    failure = read_failure(run)
    if failure is not None:
        return PointStatus(point.name, "failed", failure)
    started = [name for name in STAGES if run.marker(name).is_file()]
    if started or (run.root / RUN_LOG).is_file():
        where = f"stopped in {started[-1]}" if started else "stopped before stage 1"
        return PointStatus(point.name, "interrupted", f"{where}; the next launch resumes it")
    return PointStatus(point.name, "not started")


def sweep_status(sweep: Sweep) -> list[PointStatus]:
    return [point_status(sweep, point) for point in sweep.points]


def format_status(sweep: Sweep, statuses: list[PointStatus]) -> str:
    """A line of counts, then one row a point: name, state, detail."""
    counts = Counter(status.state for status in statuses)
    width = max([len("point")] + [len(status.name) for status in statuses])
    lines = [f"sweep {sweep.name} ({sweep.directory}): {len(statuses)} points, "
             + ", ".join(f"{counts[state]} {state}" for state in STATES),
             "", f"{'point':<{width}}  {'state':<11}  detail"]
    lines += [f"{status.name:<{width}}  {status.state:<11}  {status.detail}".rstrip() for status in statuses]
    return "\n".join(lines)
