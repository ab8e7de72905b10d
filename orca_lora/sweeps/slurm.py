"""The SLURM launcher (README, "Sweeps on a cluster"): a sweep's unfinished points as submitit job arrays,
one array (`map_array`) per dependency level, each job one point (`jobs.PointJob`).

Level 0 holds the points that read no unfinished point; level k+1 the points that read one of level k.
On SLURM a level's arrays wait for the previous level's through `--dependency=afterany:<array ids>` (each
job then checks that the runs it reads finished, and fails naming them otherwise), so the command submits
everything and returns. submitit's local executor (`cluster: local`, a rehearsal of the same jobs as
processes on this machine) has no dependencies: the launcher waits for each level, with a progress bar.
A level bigger than the cluster's MaxArraySize goes as several arrays. submitit's files (pickles, sbatch
scripts, each job's stdout and stderr) go to `<sweep>/_slurm/`; each point's own output to its run.log.

submitit is imported here only, when the launcher runs: `orca-lora run` does not pay for it.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm import tqdm

from orca_lora.errors import ConfigError, RunInterrupted
from orca_lora.run_files import RunFiles
from orca_lora.sweep_files import read_failure
from orca_lora.sweeps.jobs import PointJob, PointTask
from orca_lora.sweeps.slurm_settings import SlurmSettings, executor_parameters
from orca_lora.sweeps.stopping import SweepInterrupted, signal_name, stop_on_signals
from orca_lora.sweeps.sweep import (
    Sweep,
    SweepPoint,
    SweepResult,
    build_shared_inputs,
    unfinished_points,
    write_plan,
)
from orca_lora.sweeps.workers import FAILED, PointOutcome

log = logging.getLogger("orca_lora")

SLURM_FOLDER = "_slurm"  # under the sweep directory: submitit's pickles, sbatch scripts and job logs
POLL_SECONDS = 2.0  # how often the local rehearsal looks at its jobs


@dataclass
class Submission:
    result: SweepResult  # the points finished earlier (not submitted); the rest once the launcher waited for them
    waited: bool  # the local rehearsal waits for every job; on SLURM the command returns once it has submitted
    arrays: list[tuple[str, list[str]]] = field(default_factory=list)  # (job id, its points) per array, in order


def dependency_levels(todo: Sequence[SweepPoint]) -> list[list[SweepPoint]]:
    """The points by level: 0 reads no point of `todo`, k + 1 reads one of level k (`todo` is in run order,
    so a point's dependencies come before it)."""
    names, level = {point.name for point in todo}, {}
    for point in todo:
        level[point.name] = 1 + max((level[name] for name in point.after if name in names), default=-1)
    depth = max(level.values(), default=-1) + 1
    return [[point for point in todo if level[point.name] == k] for k in range(depth)]


def chunked(points: Sequence[SweepPoint], size: int) -> list[list[SweepPoint]]:
    return [list(points[start:start + size]) for start in range(0, len(points), size)]


def make_executor(sweep: Sweep, settings: SlurmSettings) -> Any:
    """submitit's AutoExecutor for the cluster, its logs under `<sweep>/_slurm/`."""
    if settings.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("no `sbatch` on this machine: run the slurm launcher on a SLURM login node, or rehearse "
                          "the same jobs here with --slurm cluster=local")
    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm launcher needs submitit: pip install orca-lora[slurm] (or pip install "
                          "submitit)") from None
    executor = submitit.AutoExecutor(folder=sweep.directory / SLURM_FOLDER, cluster=settings.cluster)
    try:
        executor.update_parameters(**executor_parameters(settings, f"orca-lora-{sweep.name}"))
    except (NameError, ValueError, AssertionError) as error:  # submitit's refusals of a parameter
        raise ConfigError(f"slurm settings: {str(error).splitlines()[0]}") from None
    return executor


def point_task(sweep: Sweep, point: SweepPoint) -> PointTask:
    return PointTask(sweep.point_config(point), tuple(sweep.directory / name for name in point.after))


def submit_sweep(sweep: Sweep, settings: SlurmSettings) -> Submission:
    """Submit every unfinished point, level by level; with the local rehearsal, wait for each level."""
    executor = make_executor(sweep, settings)  # first: a machine without sbatch is refused before any work
    with stop_on_signals():
        write_plan(sweep)
        finished, todo = unfinished_points(sweep)
        # submitit passes SLURM dependencies; its local executor has none, so the launcher waits instead
        submission = Submission(SweepResult(sweep.directory, skipped=[point.name for point in finished]),
                                waited=settings.cluster != "slurm")
        # the shared datasets and source body first: the jobs of an array would race to build the same files
        build_shared_inputs([sweep.point_config(point) for point in todo])
        levels, previous = dependency_levels(todo), []
        for index, level in enumerate(levels):
            if previous and not submission.waited:  # afterany: a failed dependency fails its readers, naming it
                executor.update_parameters(slurm_dependency="afterany:" + ":".join(previous))
            submitted_before = len(submission.arrays)
            jobs = _submit_level(executor, sweep, level, settings.max_array_size, submission)
            previous = [job_id for job_id, _ in submission.arrays[submitted_before:]]
            if submission.waited:
                for name, outcome in _wait(sweep, jobs, index, sum(map(len, levels[index + 1:]))).items():
                    submission.result.add(name, outcome)
    return submission


def _submit_level(executor: Any, sweep: Sweep, level: Sequence[SweepPoint], size: int,
                  submission: Submission) -> dict[Any, str]:
    """The level's arrays; each job -> its point."""
    jobs = {}
    for chunk in chunked(level, size):
        submitted = executor.map_array(PointJob(), [point_task(sweep, point) for point in chunk])
        submission.arrays.append((submitted[0].job_id.split("_")[0], [point.name for point in chunk]))
        jobs.update(zip(submitted, (point.name for point in chunk)))
        log.info("sweep %s: submitted %d point(s) as job %s", sweep.name, len(chunk), submission.arrays[-1][0])
    return jobs


def _wait(sweep: Sweep, jobs: dict[Any, str], level: int, later: int) -> dict[str, PointOutcome]:
    """Each job's outcome once it has ended. A signal (or an error) cancels the jobs still running (`later`:
    the points of the levels not submitted yet)."""
    outcomes, remaining = {}, dict(jobs)
    try:
        with tqdm(total=len(jobs), desc=f"sweep points, level {level}") as progress:
            while remaining:
                for job in [job for job in remaining if job.done()]:
                    name = remaining.pop(job)
                    outcomes[name] = _outcome(sweep, job, name)
                    progress.update()
                time.sleep(POLL_SECONDS if remaining else 0)
    except BaseException as stopped:  # a signal, or anything else: no job is left running on its own
        for job in remaining:
            job.cancel(check=False)
        if isinstance(stopped, RunInterrupted):
            raise SweepInterrupted(signal_name(stopped), len(remaining), later) from None
        raise
    return outcomes


def _outcome(sweep: Sweep, job: Any, name: str) -> PointOutcome:
    try:
        return job.result()
    except Exception:  # submitit's FailedJobError / UncompletedJobError, holding the job's traceback
        reason = read_failure(RunFiles(sweep.directory / name))
        return PointOutcome(FAILED, reason or f"its job ended without a result; see {job.paths.stderr}")
