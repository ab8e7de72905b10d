"""A sweep point as a submitit job (README, "Sweeps on a cluster"): the callable every element of a job
array runs, checkpointable by submitit's protocol. On its preemption or time-limit signal (USR2, which
SLURM sends `signal_delay_s` before the limit) submitit calls `PointJob.checkpoint`, saves what it returns,
requeues the job and ends this attempt; the requeued job calls the same point again, and the run resumes
from its own files (finished stages skipped, stage 3 from `stage3/checkpoints/last.ckpt`). A job that
fails for a real error (a config error, a diverged loss) raises: submitit requeues only on its signal.

Light to import: a job process unpickles `PointJob` by reference to this module before the point's run
imports the training stack.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca_lora.config import run_path
from orca_lora.errors import RunInterrupted
from orca_lora.run_files import RunFiles
from orca_lora.sweep_files import read_failure
from orca_lora.sweeps.workers import (
    FAILED,
    FINISHED_EARLIER,
    RUN_LOG,
    PointOutcome,
    note_interruption,
    output_to,
    point_failed,
    run_finished,
    run_point,
    start_worker,
)

if TYPE_CHECKING:
    from orca_lora.config import Config

log = logging.getLogger("orca_lora")


class PointFailed(RuntimeError):
    """The point failed; the job ends failed and is not requeued. Its reason is in `<point>/failed.txt`."""


@dataclass(frozen=True)
class PointTask:
    config: Config  # the point's config as the sweep checked it when it submitted the job
    reads: tuple[Path, ...] = ()  # the run directories of the points it reads (an earlier array ran them)


def blocking_dependency(task: PointTask) -> PointOutcome | None:
    """The failure of a point whose dependency did not finish (it failed, was stopped, or was requeued
    after this job started); None when every run it reads is finished."""
    for directory in task.reads:
        run = RunFiles(directory)
        if run.is_finished():
            continue
        why = ("failed" if read_failure(run) else "has not finished (stopped, or requeued after this job "
               "started); run the sweep command again once it has")
        return point_failed(run_path(task.config), f"not run: it reads point {directory.name}, which {why}")
    return None


def job_threads() -> int:
    """OMP_NUM_THREADS when set, else the CPUs this process may run on (SLURM's --cpus-per-task), not the
    node's, which torch would take."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class PointJob:
    """submitit's callable for one point: returns the point's `PointOutcome`, raises `PointFailed` when
    the point failed, and says how to requeue it (`checkpoint`)."""

    def __call__(self, task: PointTask) -> PointOutcome:
        start_worker(job_threads())  # the package's log lines, and torch on the job's CPUs
        directory = run_path(task.config)
        directory.mkdir(parents=True, exist_ok=True)
        with output_to(directory / RUN_LOG):
            outcome = blocking_dependency(task) or self._run(task.config)
        if outcome.state == FAILED:
            raise PointFailed(f"point {directory.name}: {outcome.reason}")
        return outcome

    @staticmethod
    def _run(config: Config) -> PointOutcome:
        if run_finished(config):  # a job submitted twice (the sweep command run again while it was queued)
            return PointOutcome(FINISHED_EARLIER)
        try:
            return run_point(config)
        except RunInterrupted as interrupted:  # SIGTERM: scancel, or a preemption SLURM requeues itself
            note_interruption(config, interrupted)
            raise

    def checkpoint(self, task: PointTask) -> Any:
        """What submitit requeues on its preemption or time-limit signal: this same call. The run's own
        files are its checkpoint, so nothing is saved here (the signal arrives inside the running point,
        whose output, this note included, goes to its run.log)."""
        from submitit.helpers import DelayedSubmission

        log.warning("sweep point %s: preempted or at its time limit; submitit requeues the job, which resumes "
                    "the run (stage 3 from its last checkpoint)", task.config.output.name)
        return DelayedSubmission(self, task)
