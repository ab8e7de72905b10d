"""How a sweep stops on a signal (README, "Sweeps on a cluster"): SIGTERM (a scheduler, `kill`) and SIGINT
(Ctrl-C) raise `RunInterrupted` in the sweep's main thread, the launcher stops what runs, and the command
prints one line and exits 128 + the signal's number (143, 130), as a shell reports a process the signal ended.

Ctrl-C raises `RunInterrupted`, not `KeyboardInterrupt`: Lightning answers a KeyboardInterrupt during
training by ignoring SIGINT for good and calling `exit(1)`, which would end the whole sweep with neither
the interrupted run's note nor the right exit code.
"""
from __future__ import annotations

import contextlib
import re
import signal
import threading
from typing import Iterator

from orca_lora.errors import RunInterrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SweepInterrupted(RunInterrupted):
    """A signal stopped the sweep: the points it ran were interrupted (each resumes on the next launch)
    and the points it had not started were left alone."""

    def __init__(self, signal_name: str, stopped: int, not_started: int):
        super().__init__(signal_name)
        self.args = (f"interrupted by {signal_name}: {stopped} running point(s) stopped, each resumes on the "
                     f"next launch; {not_started} not started; run the same command to go on",)


def signal_name(interrupted: RunInterrupted) -> str:
    """The signal's name ("SIGTERM"), also from an interruption that OmegaConf re-raised around its own
    message (it rebuilds an exception raised inside it from its text)."""
    found = re.search(r"SIG[A-Z0-9]+", interrupted.signal_name)
    return found.group() if found and found.group() in signal.Signals.__members__ else "SIGTERM"


def exit_code(interrupted: RunInterrupted) -> int:
    """What a shell reports for a process the signal ended: 128 + its number."""
    return 128 + signal.Signals[signal_name(interrupted)].value


def _raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `RunInterrupted` in the main thread meanwhile (a run's own SIGTERM handler,
    `pipeline._sigterm_raises`, does the same while it lasts). Elsewhere than the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_ignored(*numbers: signal.Signals) -> Iterator[None]:
    """The signals ignored meanwhile (by default SIGTERM and SIGINT): a second Ctrl-C must not cut a clean
    stop short, and a child started meanwhile inherits the ignored SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in numbers or STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
