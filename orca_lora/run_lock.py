"""`run.lock`: the one process that writes a run directory holds it from start to exit, so two
runs of one config (two sweep workers, a rerun beside a live run) cannot interleave their files."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from orca_lora.run_files import RunFiles

log = logging.getLogger("orca_lora")

LOCK_FILE = "run.lock"


class RunDirectoryBusy(OSError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """`run.lock` in a run directory: held by the one process that writes it, from start to exit.

    Created with an exclusive hard link of a fully written temp file, so a reader never sees half a
    lock and two starters never both win. A lock left by a dead process of this host is stale and
    taken over; one from another host cannot be checked from here, so it is reported with its host
    and age for the user to judge.
    """

    def __init__(self, run: RunFiles):
        self.path = run.root / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released (or unreadable and removed) meanwhile: try again
            if holder.get("host") == self.owner["host"] and not _alive(int(holder.get("pid", -1))):
                log.warning("%s: stale lock of pid %s (no longer running) removed", self.path, holder.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            age = time.time() - float(holder.get("started", time.time()))
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                f"(started {age:.0f} s ago); wait for it to finish, or, if that process is gone, "
                f"delete {self.path}")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        temp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(self.owner) + "\n")
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: unreadable lock file removed", self.path)
            self.path.unlink(missing_ok=True)
            return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def lock_holder(run: RunFiles) -> dict[str, Any] | None:
    """Who holds the run's lock ({pid, host, started}), read without taking it; None when no live process
    does: no lock, an unreadable one, or a stale one of a dead process of this host. A lock of another
    host cannot be checked from here and counts as held."""
    try:
        holder = json.loads((run.root / LOCK_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return None
    return holder
