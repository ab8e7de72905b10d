"""The grid language of a sweep file (README, "Sweeps"): axes that multiply out into points, a named
option's `{point: NAME}` reference to another point's run directory, and the order that runs a point after
the points it reads. Pure: no file, no config loading beyond the schema's shape."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from orca_lora.config import ConfigError, config_schema


@dataclass(frozen=True)
class SweepPoint:
    name: str  # its run directory under the sweep directory, e.g. "darcy_rank8_uniform"
    labels: dict[str, str]  # axis -> its part of the name
    overrides: tuple[str, ...]  # the point's own key=value overrides
    references: tuple[tuple[str, str], ...] = ()  # (config key, point name with {axis} fields): `{point: NAME}`
    after: tuple[str, ...] = ()  # the points whose run directories it reads: they run first


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
        raise ConfigError(f"{key}: a mapping value must be {{point: NAME}} (the run directory of point NAME), "
                          f"got {value} ({where})")
    return key, value["point"]


def _axis_points(where: str, key: str, label: str, values: Any) -> list[AxisValue]:
    """Each value of one axis: a named option's own label, or the axis label and the value ("rank8")."""
    if isinstance(values, dict):
        options = []
        for label, settings in values.items():
            if not isinstance(settings, dict) or not settings:
                raise ConfigError(f"named axis {key!r} option {label!r} must map config keys to values, "
                                  f"e.g. {{task.name: darcy}} ({where})")
            options.append(AxisValue(
                str(label), tuple(f"{k}={format_value(v)}" for k, v in settings.items() if not _is_reference(k, v)),
                tuple(_point_reference(f"{where} {key}.{label}", k, v) for k, v in settings.items()
                      if _is_reference(k, v))))
        return options
    if isinstance(values, list) and values:
        return [AxisValue(f"{label}{format_value(value)}", (f"{key}={format_value(value)}",)) for value in values]
    raise ConfigError(f"axis {key!r} needs a non-empty list of values or a mapping of named options ({where})")


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
            raise ConfigError(f"grids[{index}] must be a non-empty mapping of axes ({where})")
        labels = _axis_labels(list(grid))
        axes = [_axis_points(f"{where} grids[{index}]", key, labels[key], values) for key, values in grid.items()]
        for combination in itertools.product(*axes):
            point_labels = {labels[key]: value.label for key, value in zip(grid, combination)}
            name = "_".join(point_labels.values())
            point = SweepPoint(name, point_labels, tuple(item for value in combination for item in value.overrides),
                               tuple(item for value in combination for item in value.references))
            known = points.get(name)
            if known is not None and (known.overrides, known.references) != (point.overrides, point.references):
                raise ConfigError(f"two points are both named {name!r} with different overrides; rename one of "
                                  f"the named options ({where})")
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
                raise ConfigError(f"point {point.name}: {key}: {{point: {template}}} is not filled by the point's "
                                  f"axes {sorted(point.labels)} ({error!r}; {where})") from None
            if name not in names or name == point.name:
                named = "the point itself" if name == point.name else "no point of the sweep"
                raise ConfigError(f"point {point.name}: {key}: {{point: {template}}} names {name!r}, {named}; "
                                  f"{_name_hint(names - {point.name})} ({where})")
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
            raise ConfigError(f"points read each other's run directories in a cycle: "
                              f"{', '.join(f'{p.name} after {list(p.after)}' for p in waiting)} ({where})")
        waiting.remove(ready)
        placed.append(ready)
        done.add(ready.name)
    return placed


def _name_hint(names: set[str]) -> str:
    return f"points are named like {', '.join(sorted(names)[:3])}" if names else "the sweep has no other point"
