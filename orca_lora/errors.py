"""Errors that end a run with a message of their own (the CLI prints one line and exits non-zero).
No heavy imports: the CLI imports this module before it knows which command runs."""
from __future__ import annotations

INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class ConfigError(ValueError):
    """A configuration problem, with the dotted key and the fix in the message."""


class RunInterrupted(Exception):
    """A signal (SLURM's time limit, preemption, `kill`) stopped the run; the same command resumes it."""

    def __init__(self, signal_name: str, stage: str | None = None):
        self.signal_name, self.stage = signal_name, stage
        where = f" during {stage}" if stage else ""
        super().__init__(f"interrupted by {signal_name}{where}; run the same command to resume")

    def during(self, stage: str) -> "RunInterrupted":
        return self if self.stage else RunInterrupted(self.signal_name, stage)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or error: the run failed, and its stage stays unfinished."""
