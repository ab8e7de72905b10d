"""Worker processes of a local sweep (`--workers N`, README "Sweeps"): each a fresh interpreter that keeps
torch and Lightning imported across its points and is handed one point at a time, so a point the sweep has
not handed out never starts.

Stopping is the pool's job, not the operating system's: `stop` sends SIGTERM to the busy workers (their
run raises `RunInterrupted`, says so in its run.log and reports back), closes the idle ones and kills what
is left after `STOP_GRACE_SECONDS`. A worker whose sweep process died (SIGKILL, a crash) stops its point
the same way (`watch_parent`), so no worker outlives its sweep.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from orca_lora.config import run_path
from orca_lora.errors import INTERRUPTED_EXIT_CODE, RunInterrupted
from orca_lora.sweeps import workers
from orca_lora.sweeps.stopping import signals_ignored
from orca_lora.sweeps.workers import INTERRUPTED, PointOutcome

if TYPE_CHECKING:
    from orca_lora.config import Config

STOP_GRACE_SECONDS = 6.0  # for an interrupted run to note it and report, before its worker is killed
PARENT_POLL_SECONDS = 1.0


@dataclass
class Worker:
    process: BaseProcess
    connection: Connection  # the sweep's end: a point's config goes out, its PointOutcome comes back
    point: str | None = None  # the point it runs; None when idle
    directory: Path | None = None  # that point's run directory


class WorkerPool:
    """`size` spawned worker processes on `threads` threads each."""

    def __init__(self, size: int, threads: int):
        # spawn: a fresh interpreter, not a fork of one holding torch's threads
        self._context = multiprocessing.get_context("spawn")
        self._size, self._threads = size, threads
        self._stopping = False
        self.workers: list[Worker] = []  # started with the first points they get, never more than the points

    def _spawn(self) -> Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=worker_main, args=(theirs, self._threads, os.getpid()),
                                        name="orca-lora sweep worker")
        with signals_ignored(signal.SIGINT):  # inherited: a Ctrl-C on the terminal is the sweep's to act on
            process.start()
        theirs.close()
        return Worker(process, ours)

    @property
    def idle(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.point is None]

    @property
    def busy(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.point is not None]

    @property
    def has_room(self) -> bool:
        return bool(self.idle) or len(self.workers) < self._size

    def start(self, name: str, config: Config) -> None:
        """Hand the point to an idle worker, started now if need be (`has_room` must hold). One that died
        meanwhile fails the point when `wait` finds it dead."""
        if not self.idle:
            self.workers.append(self._spawn())
        worker = self.idle[0]
        worker.point, worker.directory = name, run_path(config)
        try:
            worker.connection.send(config)
        except OSError:
            pass

    def wait(self, timeout: float | None = None) -> list[tuple[str, PointOutcome]]:
        """Each point a busy worker reported (at least one, unless `timeout` ran out); a worker that died
        fails its point and is replaced."""
        busy = self.busy
        ready = set(wait([w.connection for w in busy] + [w.process.sentinel for w in busy], timeout))
        return [self._report(w) for w in busy if {w.connection, w.process.sentinel} & ready]

    def _report(self, worker: Worker) -> tuple[str, PointOutcome]:
        name, worker.point = worker.point, None
        try:
            return name, worker.connection.recv()
        except (EOFError, OSError):  # it died: killed, out of memory, or stopped before it could report
            worker.process.join()
        code = worker.process.exitcode
        if self._stopping:
            return name, PointOutcome(INTERRUPTED, f"its worker was stopped (exit code {code})")
        self.workers[self.workers.index(worker)] = self._spawn()
        reason = f"its worker process died (exit code {code}); see {name}/run.log"
        return name, workers.point_failed(worker.directory, reason)

    def stop(self) -> list[tuple[str, PointOutcome]]:
        """Interrupt the busy workers' points and end every worker; the points they reported meanwhile."""
        self._stopping = True
        reports = []
        with signals_ignored():  # a second signal must not leave workers behind
            for worker in self.busy:
                worker.process.terminate()  # SIGTERM: the run raises RunInterrupted and reports back
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while self.busy and time.monotonic() < deadline:
                reports += self.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._end(deadline)
        return reports

    def close(self) -> None:
        """End the idle workers (every worker, once the sweep has its points back)."""
        self._stopping = True
        self._end(time.monotonic() + STOP_GRACE_SECONDS)

    def _end(self, deadline: float) -> None:
        for worker in self.workers:
            worker.connection.close()  # an idle worker's next read ends it
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.workers = []


def worker_main(connection: Connection, threads: int, parent: int) -> None:
    """A worker's life: points from `connection` until it closes, each point's outcome sent back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_interrupted)  # also between points: a stop ends an idle worker
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    code = 0
    try:
        workers.start_worker(threads)
        while True:
            config = connection.recv()
            connection.send(workers.run_in_worker(config))
    except (EOFError, OSError, RunInterrupted):  # the sweep closed its end, died, or stopped this worker
        pass
    except BaseException:  # a bug in the worker itself: its traceback, and exit code 1
        traceback.print_exc()
        code = 1
    finally:  # at once: the interpreter's teardown of torch and Lightning takes seconds, and nothing is left
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signal.Signals(signum).name)


def watch_parent(parent: int) -> None:
    """Once the sweep process is gone (this worker is re-parented), stop the running point as the sweep
    would (SIGTERM to this process), then exit if it has not within the grace period."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)
    os._exit(INTERRUPTED_EXIT_CODE)
