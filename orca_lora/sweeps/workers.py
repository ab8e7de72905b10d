"""How one sweep point runs, wherever it runs (the sweep's own process, a local worker process, a SLURM
job): its outcome, a failure recorded in its run directory (`failed.txt`, which `sweep --status` reads),
and its output appended to the point's `run.log`, one block per attempt."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from orca_lora.config import run_path, saved_config_matches
from orca_lora.errors import RunInterrupted
from orca_lora.run_files import RunFiles
from orca_lora.sweep_files import clear_failure, write_failure
from orca_lora.sweeps.stopping import signal_name

if TYPE_CHECKING:
    from orca_lora.config import Config

log = logging.getLogger("orca_lora")

RUN_LOG = "run.log"
FINISHED = "finished"  # it ran here to its end
FINISHED_EARLIER = "finished earlier"  # by another sweep, before it started here: nothing trained here
FAILED = "failed"
ELSEWHERE = "running elsewhere"  # another sweep holds its run directory, or the run it reads
INTERRUPTED = "interrupted"  # a signal stopped it; the next launch resumes it


@dataclass(frozen=True)
class PointOutcome:
    state: str  # one of the states above
    reason: str = ""  # one line: why it failed, who holds it, what stopped it


def run_finished(config: Config) -> bool:
    """metrics.json is there and the run's saved config is `config` (`saved_config_matches`)."""
    run = RunFiles(run_path(config))
    return run.is_finished() and run.config.is_file() and saved_config_matches(run.config, config)


def point_failed(directory: Path, reason: str) -> PointOutcome:
    """Record the failure in the point's run directory (for `--status` and the next launch) and report it."""
    write_failure(RunFiles(directory), reason)
    return PointOutcome(FAILED, reason)


def run_point(config: Config) -> PointOutcome:
    """Run one point's pipeline and plot it. A failure is reported, not raised (one failed point must not
    stop the others) and recorded in `failed.txt`; a busy run directory is another sweep's work. A signal's
    `RunInterrupted` goes on up: where the point runs decides what it stops."""
    from orca_lora.pipeline import run_pipeline
    from orca_lora.reports.run_plots import plot_run
    from orca_lora.run_lock import RunDirectoryBusy

    run, started = RunFiles(run_path(config)), time.time()
    try:
        plot_run(run_pipeline(config).directory)
    except RunDirectoryBusy as busy:
        log.info("sweep point %s: %s", run.root.name, busy)
        return PointOutcome(ELSEWHERE, str(busy).split(";")[0])
    except RunInterrupted:
        raise
    except Exception as error:
        log.exception("sweep point %s failed", run.root.name)
        return point_failed(run.root, f"{type(error).__name__}: {error}")
    clear_failure(run)
    return PointOutcome(FINISHED if _trained_since(run, started) else FINISHED_EARLIER)


def _trained_since(run: RunFiles, started: float) -> bool:
    """Stage 3 ran (or resumed) since `started`: its marker is written when it starts and when it ends, and
    left alone when it is skipped as finished earlier (by another sweep, meanwhile)."""
    marker = run.marker("stage3")
    return not marker.is_file() or marker.stat().st_mtime >= started


def _attempt_header(directory: Path) -> str:
    return (f"===== sweep point {directory.name}: attempt of {time.strftime('%Y-%m-%d %H:%M:%S')} on "
            f"{socket.gethostname()}, pid {os.getpid()} =====\n")


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (Python's and the libraries' own writes) are appended to `path`
    meanwhile, after a header naming the attempt."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as stream:
        stream.write(_attempt_header(path.parent))
        stream.flush()
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """The package's log lines are also appended to `path` meanwhile: a point run in the sweep's own
    process keeps its console and still leaves a run.log."""
    logger = logging.getLogger("orca_lora")
    handler = logging.FileHandler(path)
    handler.setFormatter(next((known.formatter for known in logger.handlers), None))
    handler.stream.write(_attempt_header(path.parent))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def note_interruption(config: Config, interrupted: RunInterrupted) -> str:
    """Say in the point's log (its run.log) that a signal stopped it; the one-line reason."""
    during = f" during {interrupted.stage}" if interrupted.stage else ""
    what = f"interrupted by {signal_name(interrupted)}{during}"
    log.warning("sweep point %s: %s; the next launch of the sweep resumes it", config.output.name, what)
    return what


def run_in_process(config: Config) -> PointOutcome:
    """One point in the sweep's own process, its log lines also in its run.log. An interruption, noted
    there, goes on up: it stops the sweep."""
    directory = run_path(config)
    directory.mkdir(parents=True, exist_ok=True)
    with log_to(directory / RUN_LOG):
        try:
            return run_point(config)
        except RunInterrupted as interrupted:
            note_interruption(config, interrupted)
            raise


def run_in_worker(config: Config) -> PointOutcome:
    """One point in a worker process: all its output in its run.log; an interruption is its outcome."""
    directory = run_path(config)
    directory.mkdir(parents=True, exist_ok=True)
    with output_to(directory / RUN_LOG):
        try:
            return run_point(config)
        except RunInterrupted as interrupted:
            return PointOutcome(INTERRUPTED, note_interruption(config, interrupted))


def start_worker(threads: int) -> None:
    """A worker process keeps torch, Lightning and the caches it loads across its points (~11 s of
    imports a point otherwise), on `threads` threads."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    from orca_lora.logs import configure_logging

    torch.set_num_threads(threads)
    configure_logging()
