"""Sweeps: one base config times a grid of overrides; each point an ordinary run directory (README, "Sweeps").

A sweep file names a base config, overrides shared by every point, and one or more grids whose
axes multiply out into points (the grid language is `grid.py`'s):

    name: sweep_quick                     # points go to <output.root>/sweep_quick/<point>/
    base: quickstart.yaml                 # relative to the sweep file
    set: [trainer.max_epochs=20]          # applied to every point
    grids:                                # the points are the union of the grids' products
      - stage3.rank: [1, 2, 4]            # a config key and its values
        task:                             # a named axis: label -> overrides
          darcy: {task.name: darcy}
          near-source: {task.name: procedural, task.class_offset: 16}
    slurm: {partition: gpu, time: 120}    # for `--launcher slurm` (slurm_settings.py)

A named option's value `{point: NAME}` is the run directory of the sweep's point NAME, and the point
runs after NAME has finished (with either launcher, and in the order of the printed commands); NAME may
hold `{axis}`, this point's own label on that axis. A point whose dependency failed is not run; it fails
naming the dependency.

The local launcher (`run_sweep`) runs the unfinished points in this process one after another, or in
worker processes side by side (`pool.py`, `workers` > 1); SIGTERM or Ctrl-C stops it cleanly
(`stopping.py`). A point whose run directory another sweep holds is left to that sweep. `slurm.py`
submits the same points as SLURM job arrays; `print_commands` gives the same commands for any scheduler.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from tqdm import tqdm

from orca_lora.config import Config, ConfigError, section_hash
from orca_lora.config_load import load_config
from orca_lora.errors import RunInterrupted
from orca_lora.files import write_text_atomic
from orca_lora.sweeps.grid import SweepPoint, grid_points, resolve_references
from orca_lora.sweeps.pool import WorkerPool
from orca_lora.sweeps.slurm_settings import check_section
from orca_lora.sweeps.stopping import SweepInterrupted, signal_name, stop_on_signals
from orca_lora.sweeps.workers import (
    ELSEWHERE,
    FAILED,
    FINISHED,
    FINISHED_EARLIER,
    INTERRUPTED,
    PointOutcome,
    point_failed,
    run_finished,
    run_in_process,
)

log = logging.getLogger("orca_lora")

SWEEP_KEYS = ("name", "base", "set", "grid", "grids", "slurm")
SHARED_STAGES = "_shared_stages"  # under the sweep directory: stage-1/2 results by config hash


@dataclass
class Sweep:
    name: str
    base: Path
    shared: tuple[str, ...]  # overrides for every point: the file's `set`, then the command line's
    points: list[SweepPoint]
    directory: Path  # <base output.root>/<name>
    slurm: dict[str, Any] = field(default_factory=dict)  # the file's `slurm:` section, for --launcher slurm

    def point_overrides(self, point: SweepPoint) -> list[str]:
        """Points share their finished stages 1 and 2 through `<sweep>/_shared_stages` unless the sweep's
        `set` or the command line sets output.shared_stages (null: each point computes its own)."""
        return [f"output.shared_stages={self.directory / SHARED_STAGES}", *self.shared, *point.overrides,
                f"output.root={self.directory}", f"output.name={point.name}"]

    def point_config(self, point: SweepPoint) -> Config:
        every = self.point_overrides(point)  # the shared part first, merged once for every point
        try:
            return load_config(self.base, every[len(self.shared) + 1:], shared=every[:len(self.shared) + 1])
        except ConfigError as error:
            raise ConfigError(without_overrides(error, self.base, every)) from None


def without_overrides(error: ConfigError, base: Path, overrides: Sequence[str]) -> str:
    """`load_config`'s message without the `<base> with --set <every override>: ` it starts with: a point's
    overrides run to hundreds of characters, and the point's name says which they are."""
    message, where = str(error), f"{base} with --set {' '.join(overrides)}: "
    return message[len(where):] if message.startswith(where) else message


def _read_spec(path: Path) -> dict[str, Any]:
    """The sweep file as a mapping, its keys checked."""
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # yaml's parser errors have no common base worth naming
        raise ConfigError(f"not valid YAML: {path} ({' '.join(str(error).split())})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"the top level of {path} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; a sweep file has {', '.join(SWEEP_KEYS)}")
    for key in ("name", "base"):
        if not spec.get(key):
            raise ConfigError(f"missing {key!r} in {path} (the sweep's name and its base config file)")
    if ("grid" in spec) == ("grids" in spec):
        raise ConfigError(f"give exactly one of 'grid' (one mapping of axes) or 'grids' (a list of them) "
                          f"in {path}")
    return spec


def load_sweep(path: str | Path, overrides: Sequence[str] = (), check: bool = True) -> Sweep:
    """Read a sweep file; with `check`, validate every point's config before anything runs (`--status`
    only reads the run directories and skips it)."""
    path = Path(path)
    spec = _read_spec(path)
    grids = [spec["grid"]] if "grid" in spec else spec["grids"]
    if not isinstance(grids, list):
        raise ConfigError(f"'grids' must be a list of mappings of axes ({path})")
    if not grids:
        raise ConfigError(f"empty grid: {path} has `grids: []`, so no point to run; give at least one grid "
                          "of axes")
    check_section(spec.get("slurm"), str(path))
    base = path.parent / spec["base"]
    shared = tuple(spec.get("set") or ()) + tuple(overrides)
    try:
        root = Path(load_config(base, shared).output.root)
    except ConfigError as error:
        raise ConfigError(f"{without_overrides(error, base, shared)} (the sweep's `set` and --set on {base}; "
                          f"{path})") from None
    directory = root / str(spec["name"])
    points = resolve_references(grid_points(grids, str(path)), directory, str(path))
    sweep = Sweep(str(spec["name"]), base, shared, points, directory, dict(spec.get("slurm") or {}))
    if check:
        check_points(sweep, path)
    return sweep


def check_points(sweep: Sweep, path: Path) -> None:
    """Every point's config, and its ranks and budget against its body's shapes (one architecture
    built per distinct source section), before any point runs."""
    from orca_lora.preflight import body_architecture, check_against_body

    bodies = {}
    for point in sweep.points:
        try:
            config = sweep.point_config(point)
            key = section_hash(config, "source")
            if key not in bodies:
                bodies[key] = body_architecture(config.source)
            # a point reading another point's run is checked against that run when it starts
            check_against_body(config, bodies[key], read_other_runs=not point.after)
        except (ConfigError, KeyError, ValueError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ConfigError(f"point {point.name}: {message} ({path})") from None


def point_command(sweep: Sweep, point: SweepPoint) -> list[str]:
    sets = [item for override in sweep.point_overrides(point) for item in ("--set", override)]
    return ["orca-lora", "run", str(sweep.base), *sets]


def print_commands(sweep: Sweep) -> list[str]:
    """One shell line per point, for any scheduler; a point's line comes after those of the points it reads."""
    return [shlex.join(point_command(sweep, point)) for point in sweep.points]


def is_finished(sweep: Sweep, point: SweepPoint) -> bool:
    """metrics.json is there and the run's resolved config is the point's config."""
    return run_finished(sweep.point_config(point))


def write_plan(sweep: Sweep) -> None:
    """`sweep.json`: the sweep's points and their overrides, written before any point runs (the studies
    read it to name the points that did not finish)."""
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep.directory / "sweep.json", json.dumps(
        {"name": sweep.name, "base": str(sweep.base), "set": list(sweep.shared),
         "points": [asdict(point) for point in sweep.points]}, indent=2) + "\n")


def build_shared_inputs(configs: Sequence[Config]) -> None:
    """Pretrain the offline body and generate the datasets once, before parallel workers would race
    to build the same cached files."""
    from orca_lora.data.tasks import SOURCE_TASKS, build_task
    from orca_lora.models.source import load_source_body

    built = set()
    for config in configs:
        for section, build in (("source", load_source_body), ("task", build_task)):
            key = section_hash(config, section, "data_root")
            # a task built from the source body is made in memory by each run: no cache to race for
            if key not in built and not (section == "task" and config.task.name in SOURCE_TASKS):
                built.add(key)
                build(getattr(config, section), config.data_root)


@dataclass
class SweepResult:
    directory: Path
    finished: list[str] = field(default_factory=list)  # points run to their end by this launch
    skipped: list[str] = field(default_factory=list)  # finished earlier with the same config (or elsewhere since)
    failed: dict[str, str] = field(default_factory=dict)  # point -> its one-line reason (also in failed.txt)
    elsewhere: dict[str, str] = field(default_factory=dict)  # point -> who runs it, or a run it reads, instead

    def add(self, name: str, outcome: PointOutcome) -> None:
        if outcome.state == FINISHED:
            self.finished.append(name)
        elif outcome.state == FINISHED_EARLIER:
            self.skipped.append(name)
        elif outcome.state == ELSEWHERE:
            self.elsewhere[name] = outcome.reason
        else:
            self.failed[name] = outcome.reason


def _dependency_outcome(sweep: Sweep, point: SweepPoint, done: dict[str, PointOutcome]) -> PointOutcome | None:
    """The outcome of a point that cannot run here because of a point it reads; None when it can run."""
    for name in point.after:
        state = done[name].state if name in done else None
        if state == FAILED:
            return point_failed(sweep.directory / point.name, f"not run: it reads point {name}, which failed")
        if state == ELSEWHERE:
            return PointOutcome(ELSEWHERE, f"not run here: it reads point {name}, which another sweep runs")
    return None


def _run_here(sweep: Sweep, todo: Sequence[SweepPoint]) -> dict[str, PointOutcome]:
    """The points one after another in this process (already in run order: a point after those it reads)."""
    done: dict[str, PointOutcome] = {}
    running = None
    try:
        for point in todo:
            outcome = _dependency_outcome(sweep, point, done)
            if outcome is None:
                running = point.name
                outcome = _finished_meanwhile(sweep, point) or run_in_process(sweep.point_config(point))
                running = None
            done[point.name] = outcome
    except RunInterrupted as interrupted:
        stopped = int(running is not None)
        raise SweepInterrupted(signal_name(interrupted), stopped, len(todo) - len(done) - stopped) from None
    return done


def _finished_meanwhile(sweep: Sweep, point: SweepPoint) -> PointOutcome | None:
    """A point another sweep finished since this one listed what to run."""
    return PointOutcome(FINISHED_EARLIER) if is_finished(sweep, point) else None


def _start_ready(sweep: Sweep, todo: set[str], pending: list[SweepPoint], done: dict[str, PointOutcome],
                 pool: WorkerPool, progress: tqdm) -> None:
    """Hand each point whose dependencies are done to a free worker, in run order (so a failure reaches the
    dependents of dependents); a point that cannot run is done at once. A point it reads outside `todo`
    (this launch's points) finished earlier."""
    for point in list(pending):
        if not all(name in done or name not in todo for name in point.after):
            continue
        outcome = _dependency_outcome(sweep, point, done)
        if outcome is None and not pool.has_room:
            continue
        outcome = outcome or _finished_meanwhile(sweep, point)
        pending.remove(point)
        if outcome is None:
            pool.start(point.name, sweep.point_config(point))
        else:
            done[point.name] = outcome
            progress.update()


def _run_parallel(sweep: Sweep, todo: Sequence[SweepPoint], workers: int) -> dict[str, PointOutcome]:
    """Points side by side in worker processes, each started once the points it reads have finished."""
    pool = WorkerPool(workers, threads=max(1, (os.cpu_count() or 1) // workers))
    names, pending, done = {point.name for point in todo}, list(todo), {}
    try:
        with tqdm(total=len(todo), desc="sweep points") as progress:
            _start_ready(sweep, names, pending, done, pool, progress)
            while pool.busy:
                for name, outcome in pool.wait():
                    done[name] = outcome
                    progress.update()
                _start_ready(sweep, names, pending, done, pool, progress)
    except RunInterrupted as interrupted:
        stopped = sum(1 for _, outcome in pool.stop() if outcome.state == INTERRUPTED)
        raise SweepInterrupted(signal_name(interrupted), stopped, len(pending)) from None
    finally:
        pool.close()
    return done


def unfinished_points(sweep: Sweep) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """(finished earlier with the same config, the rest) in run order."""
    finished = {point.name for point in sweep.points if is_finished(sweep, point)}
    return ([point for point in sweep.points if point.name in finished],
            [point for point in sweep.points if point.name not in finished])


def run_sweep(sweep: Sweep, workers: int = 1) -> SweepResult:
    """Run every unfinished point; `workers` > 1 runs them as parallel processes sharing the cores.
    SIGTERM or SIGINT stops it (`SweepInterrupted`): running points are interrupted, the rest not started."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    result, todo = SweepResult(sweep.directory), list(sweep.points)
    with stop_on_signals():
        try:
            write_plan(sweep)
            finished, todo = unfinished_points(sweep)
            result.skipped = [point.name for point in finished]
            log.info("sweep %s: %d points, %d finished earlier, %d to run with %d worker(s)", sweep.name,
                     len(sweep.points), len(finished), len(todo), workers)
            if workers == 1:
                done = _run_here(sweep, todo)
            else:
                build_shared_inputs([sweep.point_config(point) for point in todo])
                done = _run_parallel(sweep, todo, workers)
        except SweepInterrupted:
            raise
        except RunInterrupted as interrupted:  # before any point ran
            raise SweepInterrupted(signal_name(interrupted), 0, len(todo)) from None
    for point in todo:
        result.add(point.name, done[point.name])
    return result
