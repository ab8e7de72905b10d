"""Sweeps: one base config times a grid of overrides; each point an ordinary run directory (README, "Sweeps").

A sweep file names a base config, overrides shared by every point, and one or more grids whose
axes multiply out into points:

    name: sweep_quick                     # points go to <output.root>/sweep_quick/<point>/
    base: quickstart.yaml                 # relative to the sweep file
    set: [trainer.max_epochs=20]          # applied to every point
    grids:                                # the points are the union of the grids' products
      - stage3.rank: [1, 2, 4]            # a config key and its values
        task:                             # a named axis: label -> overrides
          darcy: {task.name: darcy}
          near-source: {task.name: procedural, task.class_offset: 16}

A named option's value `{point: NAME}` is the run directory of the sweep's point NAME, and the point
runs after NAME has finished (in-process, with workers, and in the order of the printed commands);
NAME may hold `{axis}`, this point's own label on that axis, e.g. the ibp-lora run of the same task
and seed:

      - task: {darcy: {task.name: darcy}}
        seed: [0, 1]
        allocation:
          ibp-posterior: {stage2.allocation: ibp-posterior, stage2.posterior_run: {point: "{task}_flat_{seed}"}}

A point whose dependency failed is not run; it fails naming the dependency.

Points run in this process one after another, or in worker processes side by side (`workers.py`)
(`workers` > 1); `print_commands` gives the same commands for any scheduler.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from orca_lora.config import Config, ConfigError, config_schema, section_hash, to_yaml
from orca_lora.config_load import load_config
from orca_lora.files import write_text_atomic
from orca_lora.run_files import RunFiles
from orca_lora.sweeps import workers as sweep_workers

log = logging.getLogger("orca_lora")

SWEEP_KEYS = ("name", "base", "set", "grid", "grids")
SHARED_STAGES = "_shared_stages"  # under the sweep directory: stage-1/2 results by config hash


@dataclass(frozen=True)
class SweepPoint:
    name: str  # its run directory under the sweep directory, e.g. "darcy_rank8_uniform"
    labels: dict[str, str]  # axis -> its part of the name
    overrides: tuple[str, ...]  # the point's own key=value overrides
    references: tuple[tuple[str, str], ...] = ()  # (config key, point name with {axis} fields): `{point: NAME}`
    after: tuple[str, ...] = ()  # the points whose run directories it reads: they run first


@dataclass
class Sweep:
    name: str
    base: Path
    shared: tuple[str, ...]  # overrides for every point: the file's `set`, then the command line's
    points: list[SweepPoint]
    directory: Path  # <base output.root>/<name>

    def point_overrides(self, point: SweepPoint) -> list[str]:
        """Points share their finished stages 1 and 2 through `<sweep>/_shared_stages` unless the sweep's
        `set` or the command line sets output.shared_stages (null: each point computes its own)."""
        return [f"output.shared_stages={self.directory / SHARED_STAGES}", *self.shared, *point.overrides,
                f"output.root={self.directory}", f"output.name={point.name}"]

    def point_config(self, point: SweepPoint) -> Config:
        every = self.point_overrides(point)  # the shared part first, merged once for every point
        return load_config(self.base, every[len(self.shared) + 1:], shared=every[:len(self.shared) + 1])


@dataclass
class SweepResult:
    directory: Path
    finished: list[str] = field(default_factory=list)  # points run now
    skipped: list[str] = field(default_factory=list)  # points finished earlier with the same config
    failed: dict[str, str] = field(default_factory=dict)  # point -> where to read why


def format_value(value: Any) -> str:
    """A YAML scalar or flow collection as `--set` takes it: true, null, 0.5, [2,2], {0: 1}."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _is_mapping_setting(key: str) -> bool:
    """A config key whose value is itself a mapping (stage3.rank_map, stage3.block_ranks)."""
    return isinstance(OmegaConf.select(config_schema(), key), DictConfig)


def _is_reference(key: str, value: Any) -> bool:
    return isinstance(value, dict) and not _is_mapping_setting(key)


@dataclass(frozen=True)
class AxisValue:
    label: str  # its part of the point name
    overrides: tuple[str, ...]
    references: tuple[tuple[str, str], ...] = ()


def _point_reference(where: str, key: str, value: dict) -> tuple[str, str]:
    if set(value) != {"point"} or not isinstance(value["point"], str):
        raise ConfigError(f"{where}: {key}: a mapping value must be {{point: NAME}} (the run directory of point "
                          f"NAME), got {value}")
    return key, value["point"]


def _axis_points(where: str, key: str, label: str, values: Any) -> list[AxisValue]:
    """Each value of one axis: a named option's own label, or the axis label and the value ("rank8")."""
    if isinstance(values, dict):
        options = []
        for label, settings in values.items():
            if not isinstance(settings, dict) or not settings:
                raise ConfigError(f"{where}: named axis {key!r} option {label!r} must map config keys to values, "
                                  f"e.g. {{task.name: darcy}}")
            options.append(AxisValue(
                str(label), tuple(f"{k}={format_value(v)}" for k, v in settings.items() if not _is_reference(k, v)),
                tuple(_point_reference(f"{where} {key}.{label}", k, v) for k, v in settings.items()
                      if _is_reference(k, v))))
        return options
    if isinstance(values, list) and values:
        return [AxisValue(f"{label}{format_value(value)}", (f"{key}={format_value(value)}",)) for value in values]
    raise ConfigError(f"{where}: axis {key!r} needs a non-empty list of values or a mapping of named options")


def _axis_labels(keys: Sequence[str]) -> dict[str, str]:
    """The last part of a dotted key names the axis in point names, unless two axes share it."""
    short = {key: key.rsplit(".", 1)[-1] for key in keys}
    counts = {label: list(short.values()).count(label) for label in short.values()}
    return {key: label if counts[label] == 1 else key for key, label in short.items()}


def grid_points(grids: Sequence[dict], where: str = "sweep") -> list[SweepPoint]:
    """The union of each grid's product of axes, in file order, without duplicates."""
    points: dict[str, SweepPoint] = {}
    for index, grid in enumerate(grids):
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{where}: grids[{index}] must be a non-empty mapping of axes")
        labels = _axis_labels(list(grid))
        axes = [_axis_points(f"{where} grids[{index}]", key, labels[key], values) for key, values in grid.items()]
        for combination in itertools.product(*axes):
            point_labels = {labels[key]: value.label for key, value in zip(grid, combination)}
            name = "_".join(point_labels.values())
            point = SweepPoint(name, point_labels, tuple(item for value in combination for item in value.overrides),
                               tuple(item for value in combination for item in value.references))
            known = points.get(name)
            if known is not None and (known.overrides, known.references) != (point.overrides, point.references):
                raise ConfigError(f"{where}: two points are both named {name!r} with different overrides; "
                                  "rename one of the named options")
            points.setdefault(name, point)
    return list(points.values())


def resolve_references(points: Sequence[SweepPoint], directory: Path, where: str) -> list[SweepPoint]:
    """Each `{point: NAME}` turned into the override `key=<directory>/<NAME>`, NAME recorded in `after`."""
    names = {point.name for point in points}
    resolved = []
    for point in points:
        overrides, after = list(point.overrides), []
        for key, template in point.references:
            try:
                name = template.format(**point.labels)
            except (KeyError, IndexError, ValueError) as error:
                raise ConfigError(f"{where}: point {point.name}: {key}: {{point: {template}}} is not filled by the "
                                  f"point's axes {sorted(point.labels)} ({error!r})") from None
            if name not in names or name == point.name:
                raise ConfigError(f"{where}: point {point.name}: {key}: {{point: {template}}} names "
                                  f"{name!r}, {'the point itself' if name == point.name else 'no point of the sweep'}; "
                                  f"points are named like {sorted(names - {point.name})[:3]}")
            overrides.append(f"{key}={directory / name}")
            after.append(name)
        resolved.append(replace(point, overrides=tuple(overrides), after=tuple(dict.fromkeys(after))))
    return run_order(resolved, where)


def run_order(points: Sequence[SweepPoint], where: str) -> list[SweepPoint]:
    """The points in file order, except that each comes after the points it reads (a stable topological sort)."""
    placed: list[SweepPoint] = []
    done: set[str] = set()
    waiting = list(points)
    while waiting:
        ready = next((point for point in waiting if done.issuperset(point.after)), None)
        if ready is None:
            raise ConfigError(f"{where}: points read each other's run directories in a cycle: "
                              f"{', '.join(f'{p.name} after {list(p.after)}' for p in waiting)}")
        waiting.remove(ready)
        placed.append(ready)
        done.add(ready.name)
    return placed


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read a sweep file and validate every point's config before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # yaml's parser errors have no common base worth naming
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a sweep file has {', '.join(SWEEP_KEYS)}")
    for key in ("name", "base"):
        if not spec.get(key):
            raise ConfigError(f"{path}: missing {key!r} (the sweep's name and its base config file)")
    if ("grid" in spec) == ("grids" in spec):
        raise ConfigError(f"{path}: give exactly one of 'grid' (one mapping of axes) or 'grids' (a list of them)")
    grids = [spec["grid"]] if "grid" in spec else spec["grids"]
    if not isinstance(grids, list):
        raise ConfigError(f"{path}: 'grids' must be a list of mappings of axes")
    base = path.parent / spec["base"]
    shared = tuple(spec.get("set") or ()) + tuple(overrides)
    root = Path(load_config(base, shared).output.root)
    directory = root / str(spec["name"])
    points = resolve_references(grid_points(grids, str(path)), directory, str(path))
    sweep = Sweep(str(spec["name"]), base, shared, points, directory)
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
            raise ConfigError(f"{path}: point {point.name}: {message}") from None


def point_command(sweep: Sweep, point: SweepPoint) -> list[str]:
    sets = [item for override in sweep.point_overrides(point) for item in ("--set", override)]
    return ["orca-lora", "run", str(sweep.base), *sets]


def print_commands(sweep: Sweep) -> list[str]:
    """One shell line per point, for any scheduler; a point's line comes after those of the points it reads."""
    return [shlex.join(point_command(sweep, point)) for point in sweep.points]


def is_finished(sweep: Sweep, point: SweepPoint) -> bool:
    """metrics.json is there and the run's resolved config is the point's config."""
    run = RunFiles(sweep.directory / point.name)
    return (run.is_finished() and run.config.is_file()
            and run.config.read_text() == to_yaml(sweep.point_config(point)))


def build_shared_inputs(configs: Sequence[Config]) -> None:
    """Pretrain the offline body and generate the datasets once, before parallel workers would race
    to build the same cached files."""
    from orca_lora.data.tasks import build_task
    from orca_lora.models.source import load_source_body

    built = set()
    for config in configs:
        for section, build in (("source", load_source_body), ("task", build_task)):
            key = section_hash(config, section, "data_root")
            if key not in built:
                built.add(key)
                build(getattr(config, section), config.data_root)


def _failed_dependency(point: SweepPoint, done: dict[str, str | None]) -> str | None:
    failed = [name for name in point.after if done.get(name)]
    return f"not run: it reads point {failed[0]}, which failed" if failed else None


def _run_parallel(sweep: Sweep, todo: Sequence[SweepPoint], workers: int) -> dict[str, str | None]:
    """Points side by side in worker processes, each started once the points it reads have finished."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    todo_names = {point.name for point in todo}  # the other points it may read finished earlier
    pending, done = list(todo), {}
    running: dict[Future, SweepPoint] = {}
    with sweep_workers.worker_pool(workers, threads) as pool, tqdm(total=len(todo), desc="sweep points") as progress:
        def start_ready() -> None:
            for point in list(pending):  # in run order, so a failure reaches dependents of dependents
                failure = _failed_dependency(point, done)
                if failure or all(name in done or name not in todo_names for name in point.after):
                    pending.remove(point)
                    if failure:
                        done[point.name] = failure
                        progress.update()
                    else:
                        running[pool.submit(sweep_workers.run_in_worker, sweep.point_config(point),
                                             sweep.directory / point.name)] = point

        start_ready()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                point = running.pop(future)
                done[point.name] = sweep_workers.outcome(future, point.name)
                progress.update()
            start_ready()
    return done


def run_sweep(sweep: Sweep, workers: int = 1) -> SweepResult:
    """Run every unfinished point; `workers` > 1 runs them as parallel processes sharing the cores."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep.directory / "sweep.json", json.dumps(
        {"name": sweep.name, "base": str(sweep.base), "set": list(sweep.shared),
         "points": [asdict(point) for point in sweep.points]}, indent=2) + "\n")
    result = SweepResult(sweep.directory)
    todo = []
    for point in sweep.points:
        (result.skipped if is_finished(sweep, point) else todo).append(point)
    result.skipped = [point.name for point in result.skipped]
    log.info("sweep %s: %d points, %d finished earlier, %d to run with %d worker(s)", sweep.name,
             len(sweep.points), len(result.skipped), len(todo), workers)
    if workers == 1:
        done: dict[str, str | None] = {}
        for point in todo:  # already in run order: a point after the points it reads
            done[point.name] = (_failed_dependency(point, done)
                                or sweep_workers.run_point(sweep.point_config(point)))
    else:
        build_shared_inputs([sweep.point_config(point) for point in todo])
        done = _run_parallel(sweep, todo, workers)
    for point, failure in ((point, done[point.name]) for point in todo):
        if failure is None:
            result.finished.append(point.name)
        else:
            result.failed[point.name] = failure
    return result
