"""How sweep points run: here, or in worker processes that keep torch and Lightning imported across
their points, each point's output in its own run.log ."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from orca_lora.config import Config

log = logging.getLogger("orca_lora")


def run_point(config: Config) -> str | None:
    """Run one point's pipeline and plot it; the failure's one-line reason, or None."""
    from orca_lora.pipeline import run_pipeline
    from orca_lora.reports.run_plots import plot_run

    try:
        plot_run(run_pipeline(config).directory)
    except Exception as error:  # one failed point must not stop the others
        log.exception("sweep point %s failed", config.output.name)
        return f"{type(error).__name__}: {error}"
    return None


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (Python's and the libraries' own writes) go to `path` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as stream:
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


def start_worker(threads: int) -> None:
    """A worker process keeps torch, Lightning and the caches it loads across its points (~11 s of
    imports a point otherwise), on `threads` threads."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    from orca_lora.logs import configure_logging

    torch.set_num_threads(threads)
    configure_logging()


def run_in_worker(config: Config, directory: Path) -> str | None:
    """One point in a worker process, its output in `directory`/run.log."""
    directory.mkdir(parents=True, exist_ok=True)
    with output_to(directory / "run.log"):
        return run_point(config)


def worker_pool(workers: int, threads: int) -> Executor:
    # spawn: a fresh interpreter, not a fork of one holding torch's threads. Workers live for the whole
    # sweep: with max_tasks_per_child, Python 3.11's executor stopped handing out points once the first
    # workers retired (a 228-point sweep hung at point 50 with no worker left)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=(threads,))


def outcome(future: Future, name: str) -> str | None:
    try:
        return future.result()
    except BrokenProcessPool as error:  # the worker died (killed, out of memory): the point failed
        return f"its worker process died ({error}); see {name}/run.log"
