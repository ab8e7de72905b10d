"""Calibrating a planted shift on stage 2's own measure (README, "Known-answer controls";
reviews/positive_controls.md section 5): the planted-shift task sets each plane's angle so that the
block-0 gap, measured as stage 2 measures it, grows by the same amount per planted dimension.

Only gaps are read, never a training error, so the calibration cannot favour any rank. The measure is
the registered distance `CALIBRATION_DISTANCE` between pooled block-0 features in the source's units
(`gap.source_units`: standardised by the source sample's own mean and std), as `rank/gap.py` applies it.
Frechet is the controls' distance: median-bandwidth MMD has little power for a rotated covariance
(the note above measured MMD^2 near 0 for rotations of isotropic directions, and concave in k
otherwise), while the Frechet distance adds up over orthogonal directions.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from orca_lora.align.distances import get_distance
from orca_lora.rank.gap import source_units

CALIBRATION_DISTANCE = "frechet"
GRID_POINTS = 33  # dial values tried before bisecting, to find where the gap first crosses its goal
BISECTIONS = 40  # halvings of that interval: the dial to ~1e-12 of its range


def gap_to(source: Tensor, distance: str = CALIBRATION_DISTANCE) -> Callable[[Tensor], float]:
    """target features (n, d) -> the registered `distance` from the source features `source` (m, d), both
    in the source's units (computed once, here)."""
    units = source_units(source)
    standard_source, labels_s = units.standardize(source), torch.zeros(len(source), dtype=torch.long)
    measure = get_distance(distance).fn

    def gap(target: Tensor) -> float:
        labels_t = torch.zeros(len(target), dtype=torch.long)
        return float(measure(standard_source, labels_s, units.standardize(target), labels_t))

    return gap


def first_crossing(function: Callable[[float], float], goal: float, low: float, high: float) -> float | None:
    """The smallest t in [low, high] (up to the bisection's precision) with function(t) = goal, found on a
    grid of GRID_POINTS values and refined by bisection; None when the grid sees no crossing."""
    grid = np.linspace(low, high, GRID_POINTS)
    values = [function(float(t)) - goal for t in grid]
    for left, right, value_left, value_right in zip(grid[:-1], grid[1:], values[:-1], values[1:]):
        if value_left == 0:
            return float(left)
        if value_left * value_right < 0 or value_right == 0:
            for _ in range(BISECTIONS):
                middle = 0.5 * (left + right)
                value_middle = function(float(middle)) - goal
                if value_left * value_middle <= 0:
                    right = middle
                else:
                    left, value_left = middle, value_middle
            return float(0.5 * (left + right))
    return None


def calibrate_dials(gap: Callable[[Sequence[float]], float], increments: Sequence[float],
                    ranges: Sequence[tuple[float, float]]) -> list[float]:
    """Dial values v_1 .. v_m, set one at a time, with

        gap(v_1 .. v_j) - gap(()) = increments[0] + ... + increments[j - 1]   for every j,

    `gap(values)` being the measured gap with the first len(values) planted units on (the rest off) and
    ranges[j] the interval v_j is searched in. Raises naming the unit when its goal is out of reach."""
    clean = gap(())
    values: list[float] = []
    goal = clean
    for index, (increment, (low, high)) in enumerate(zip(increments, ranges)):
        goal += increment
        found = first_crossing(lambda value: gap([*values, value]), goal, low, high)
        if found is None:
            reach = max(gap([*values, float(t)]) for t in np.linspace(low, high, GRID_POINTS)) - clean
            raise ValueError(f"planted unit {index + 1} cannot bring the gap to {goal - clean:.4g} above the clean "
                             f"task's (it reaches {reach:.4g}); lower task.planted_gap or task.planted_rank, or "
                             "choose other planes (task.planted_planes)")
        values.append(found)
    return values
