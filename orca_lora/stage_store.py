"""Finished stage-1 and stage-2 directories kept by config hash, so that the points of a sweep that
share them (same seed, task, source, stage 1 and, for stage 2, rank) copy one result instead of
computing it again (README, "Sweeps"). A store entry is `<store>/<stage>/<hash>/`, the stage directory as
the run that computed it left it, marker included (and stage 2's result, its ranks.json); it is
published by an atomic rename, so a reader never sees half of one, and two runs computing the same
entry side by side keep the first.

Stage 2's measurement (the gaps, before any rank is allocated) is kept apart, as `<store>/measurements/
<hash>.json`, under a hash without stage-3 or allocation settings: the points of a rank sweep measure once."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from orca_lora.files import write_text_atomic

log = logging.getLogger("orca_lora")

SHARED_STAGES = ("stage1", "stage2")


def entry(store: Path, stage: str, digest: str) -> Path:
    return store / stage / digest


def fetch(store: Path, stage: str, digest: str, destination: Path) -> bool:
    """Copy the stored `stage` directory with config hash `digest` to `destination` (replacing it);
    False when the store has none."""
    stored = entry(store, stage, digest)
    if not (stored / "stage.json").is_file():
        return False
    if destination.exists():
        shutil.rmtree(destination)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    shutil.rmtree(partial)
    shutil.copytree(stored, partial)
    os.replace(partial, destination)
    log.info("%s: copied from %s (the same config hash %s)", stage, stored, digest)
    return True


def publish(store: Path, stage: str, digest: str, source: Path) -> None:
    """Keep a copy of the finished `source` directory under its hash, unless one is there already."""
    stored = entry(store, stage, digest)
    if stored.exists():
        return
    stored.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=stored.parent))
    shutil.rmtree(partial)
    shutil.copytree(source, partial)
    try:
        os.rename(partial, stored)
    except OSError:  # another run published the same hash first: its copy is the same result
        shutil.rmtree(partial, ignore_errors=True)


def measured_once(store: Path | None, digest: str, measure: Callable[[], Any]) -> Any:
    """`measure()`'s JSON-ready result: read from `<store>/measurements/<digest>.json` when there, otherwise
    computed and published there (no store: computed)."""
    if store is None:
        return measure()
    path = store / "measurements" / f"{digest}.json"
    if path.is_file():
        log.info("stage2: measurement read from %s (the same measurement hash %s)", path, digest)
        return json.loads(path.read_text())
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Python's JSON (NaN and inf kept, floats written to round-trip exactly); a run measuring the same side by
    # side writes the same values
    write_text_atomic(path, json.dumps(value))
    return value
