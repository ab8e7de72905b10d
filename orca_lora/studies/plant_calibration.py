"""Calibrating the known-answer controls' plants on stage 2's own measure (README, "Known-answer controls").

A planted law r* = k tests the study's fit only if the gap the study fits on (the mean over blocks of
the floor-corrected D_i) grows in proportion to k: D(k) = c k. The plant's dials are set here, before
any training and never from errors, so that it does:

1. Anchor: the smallest planted k (k = 1 is a reflection: no angle to turn) is measured at angle pi
   under each candidate plane seed; its D / k values are the candidate gaps per direction c.
2. Reach: every larger k is measured at angle pi, its largest gap (D grows with the angle on
   (0, pi]: a rotation by theta moves a token by 2 sin(theta / 2) times its part in the plane).
3. c is the largest candidate that every larger k reaches with headroom: k c <= headroom x reach.
4. Each larger k's angle is bisected on (0, pi] until D is within `tolerance` of k c.

The measure is stage 2 itself (`measure_with_stage2`: `run_pipeline(config, last_stage=2)`, read back
from the run's gaps.csv), so the calibrated D is the D the study will read.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from orca_lora.config import Config
from orca_lora.data.planted_tasks import planes_seed
from orca_lora.files import write_json_atomic
from orca_lora.run_files import RunFiles, read_gaps


@dataclass(frozen=True)
class PlantReading:
    """Stage 2's gaps for one plant: the mean floor-corrected D over blocks (what the study fits on) and D_0."""

    mean_gap: float
    block0_gap: float


@dataclass(frozen=True)
class PlantSetting:
    planted_k: int
    angle: float
    planes: int  # seed of the planted directions
    reading: PlantReading


@dataclass
class PlantCalibration:
    gap_per_direction: float  # c: the target is D(k) = c k
    settings: list[PlantSetting]  # one per k, ascending
    anchors: list[PlantSetting]  # the smallest k under every candidate plane seed
    reach: dict[int, float]  # every larger k's mean D at angle pi

    def grid_entries(self) -> dict[str, dict[str, float]]:
        """The sweep file's `task:` axis for these plants, keyed by task label."""
        return {f"k{s.planted_k}": {"task.planted_k": s.planted_k, "task.planted_angle": s.angle,
                                    "task.planted_planes": s.planes} for s in self.settings}


Measure = Callable[[int, float, int], PlantReading]  # (k, angle, planes seed) -> stage 2's reading


def calibrate_plants(measure: Measure, ks: Sequence[int], plane_seeds: Sequence[int], default_planes: int,
                     headroom: float = 0.9, tolerance: float = 0.02, max_steps: int = 14) -> PlantCalibration:
    """Dials per k such that the mean gap is c k (module docstring); raises when no c is reachable."""
    ks = sorted(set(int(k) for k in ks))
    if len(ks) < 2 or not plane_seeds:
        raise ValueError(f"calibrating plants needs >= 2 planted k and >= 1 plane seed (got k {ks}, seeds "
                         f"{list(plane_seeds)})")
    smallest, larger = ks[0], ks[1:]
    anchors = [PlantSetting(smallest, math.pi, seed, measure(smallest, math.pi, seed)) for seed in plane_seeds]
    reach = {k: measure(k, math.pi, default_planes).mean_gap for k in larger}
    limit = min(headroom * reach[k] / k for k in larger)
    usable = [a for a in anchors if 0 < a.reading.mean_gap / smallest <= limit]
    if not usable:
        found = ", ".join(f"{a.reading.mean_gap:.3g}" for a in anchors)
        raise ValueError(f"no plane seed gives k = {smallest} a gap per direction that every larger k reaches: "
                         f"D(k = {smallest}) = {found} under seeds {list(plane_seeds)}, while the largest gaps at "
                         f"angle pi allow at most {limit:.3g} per direction; try more plane seeds")
    anchor = max(usable, key=lambda a: a.reading.mean_gap)
    per_direction = anchor.reading.mean_gap / smallest
    settings = [anchor] + [_bisect_angle(measure, k, k * per_direction, default_planes, tolerance, max_steps)
                           for k in larger]
    return PlantCalibration(per_direction, settings, anchors, reach)


def _bisect_angle(measure: Measure, k: int, target: float, planes: int, tolerance: float,
                  max_steps: int) -> PlantSetting:
    low, high = 0.0, math.pi
    best = None
    for _ in range(max_steps):
        angle = (low + high) / 2
        setting = PlantSetting(k, angle, planes, measure(k, angle, planes))
        if best is None or abs(setting.reading.mean_gap - target) < abs(best.reading.mean_gap - target):
            best = setting
        if abs(setting.reading.mean_gap / target - 1) <= tolerance:
            return setting
        low, high = (angle, high) if setting.reading.mean_gap < target else (low, angle)
    raise ValueError(f"k = {k}: no angle in (0, pi] gave a mean gap within {tolerance:.0%} of {target:.4g} in "
                     f"{max_steps} bisection steps (closest {best.reading.mean_gap:.4g} at {best.angle:.4f}); "
                     "the gap is not monotone in the angle here")


def measure_with_stage2(config: Config, root: Path | None = None) -> Measure:
    """Stage 2's reading of `config`'s task under each plant (stage 3 never runs): runs go under `root`
    (a temporary folder when None), one per plant."""
    from orca_lora.pipeline import run_pipeline  # the pipeline runs stages; this module only plans them

    if config.task.name != "planted-shift":
        raise ValueError(f"task.name: calibrating plants needs planted-shift (got {config.task.name!r})")
    folder = Path(tempfile.mkdtemp(prefix="plant_calibration_")) if root is None else Path(root)

    def measure(k: int, angle: float, planes: int) -> PlantReading:
        task = replace(config.task, planted_k=k, planted_angle=angle, planted_planes=planes)
        output = replace(config.output, root=str(folder), name=f"k{k}_angle{angle:.6f}_planes{planes}",
                         shared_stages=None)
        result = run_pipeline(replace(config, task=task, output=output), last_stage=2)
        rows = read_gaps(RunFiles(result.directory))
        if rows is None:
            raise ValueError("stage2.enabled is false: no gap to calibrate the plants on")
        return PlantReading(float(np.mean([row.corrected for row in rows])), rows[0].corrected)

    return measure


def calibrate_sweep(path: Path, overrides: Sequence[str] = (), plane_seeds: int = 16,
                    output: Path | None = None) -> tuple[PlantCalibration, Path]:
    """Calibrate the plants of a planted-shift sweep file's k values on its own settings (its first
    point's config); stage-2 runs go under `<sweep dir>/_plant_calibration`, the dials to `output`
    (default `<sweep dir>/plant_calibration.json`)."""
    from orca_lora.sweeps.sweep import load_sweep

    sweep = load_sweep(path, overrides)
    configs = [sweep.point_config(point) for point in sweep.points]
    if any(config.task.name != "planted-shift" for config in configs):
        raise ValueError(f"{path}: every point must be a planted-shift task to calibrate its plants")
    base = configs[0]
    measure = measure_with_stage2(base, sweep.directory / "_plant_calibration")
    calibration = calibrate_plants(measure, [config.task.planted_k for config in configs], range(plane_seeds),
                                   planes_seed(base.task))
    output = sweep.directory / "plant_calibration.json" if output is None else Path(output)
    write_json_atomic(output, asdict(calibration))
    return calibration, output


def format_calibration(calibration: PlantCalibration) -> str:
    """A table of the calibrated plants and the sweep file's `task:` axis that sets them."""
    lines = [f"gap per planted direction c = {calibration.gap_per_direction:.4g} (mean floor-corrected D over blocks)",
             f"{'k':>3} {'angle':>9} {'planes':>6} {'mean D':>9} {'target':>9} {'D_0':>9}"]
    for s in calibration.settings:
        lines.append(f"{s.planted_k:>3} {s.angle:>9.5f} {s.planes:>6} {s.reading.mean_gap:>9.4g} "
                     f"{s.planted_k * calibration.gap_per_direction:>9.4g} {s.reading.block0_gap:>9.4g}")
    anchors = ", ".join(f"{a.planes}: {a.reading.mean_gap:.3g}" for a in calibration.anchors)
    lines.append(f"k = {calibration.settings[0].planted_k} under each plane seed (mean D): {anchors}")
    lines.append("reach at angle pi (mean D): " + ", ".join(f"k = {k}: {d:.4g}" for k, d in calibration.reach.items()))
    axis = "\n".join(f"      {label}: {{{', '.join(f'{key}: {value}' for key, value in dials.items())}}}"
                     for label, dials in calibration.grid_entries().items())
    return "\n".join(lines) + "\n\nthe sweep file's task axis:\n    task:\n" + axis
