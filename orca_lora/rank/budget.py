"""Ranks proportional to per-module scores under a parameter budget (README, "Allocations against the field").

The one budget unit every allocation meets: trainable adapter parameters sum_m r_m (d_out + d_in)
(LoRA's A and B). Given a score s_m >= 0 per adapted module (a stable rank, a gradient importance,
a posterior rank, a depth), r_m = clip(floor(c s_m), r_min, cap_m), cap_m = min(r_max, d_out, d_in),
with the largest c whose cost fits the budget (bisection: the cost is non-decreasing in c), then
ranks are added one at a time by largest remainder c s_m - floor(c s_m) while they fit, so the
cost falls short of the budget by less than one rank-1 component max_m (d_out + d_in).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from orca_lora.rank.select import ModuleShape, trainable_params

_BISECTION_STEPS = 200


def rank_caps(modules: Mapping[str, ModuleShape], r_max: int) -> dict[str, int]:
    """min(r_max, d_out, d_in) per module."""
    return {name: min(r_max, shape.d_out, shape.d_in) for name, shape in modules.items()}


def proportional_ranks(scores: Mapping[str, float], modules: Mapping[str, ModuleShape], budget: int,
                       r_min: int = 1, r_max: int = 64) -> dict[str, int]:
    """Integer ranks ~ scores that cost at most `budget` parameters, short of it by less than the
    largest rank-1 cost among the modules still below their cap (module docstring)."""
    names = list(modules)
    if set(scores) != set(names):
        missing, extra = sorted(set(names) - set(scores)), sorted(set(scores) - set(names))
        raise ValueError(f"scores must name every adapted module once: missing {missing[:3]}, unknown {extra[:3]}")
    values = np.array([float(scores[name]) for name in names])
    if not np.isfinite(values).all() or (values < 0).any():
        bad = names[int(np.flatnonzero(~np.isfinite(values) | (values < 0))[0])]
        raise ValueError(f"scores must be finite and >= 0; {bad} has {scores[bad]!r}")
    if r_min < 0:
        raise ValueError(f"r_min must be >= 0, got {r_min}")
    caps = rank_caps(modules, r_max)
    low_caps = [name for name in names if caps[name] < r_min]
    if low_caps:
        raise ValueError(f"module {low_caps[0]} allows rank <= {caps[low_caps[0]]} but r_min={r_min}")
    cap_array = np.array([caps[name] for name in names])
    unit = np.array([modules[name].d_out + modules[name].d_in for name in names])
    floor, ceiling = int(r_min * unit.sum()), int(cap_array @ unit)
    if not floor <= budget <= ceiling:
        raise ValueError(f"budget={budget} is outside the feasible range [{floor}, {ceiling}]: every module at "
                         f"r_min={r_min} .. every module at min(r_max={r_max}, d_out, d_in)")

    def ranks_at(c: float) -> np.ndarray:
        return np.clip(np.floor(c * values), r_min, cap_array).astype(int)

    low, high = 0.0, 1.0
    while int(ranks_at(high) @ unit) <= budget and (ranks_at(high) < cap_array).any() and values.any():
        high *= 2.0
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if int(ranks_at(middle) @ unit) <= budget else (low, middle)
    ranks = ranks_at(low)
    left = budget - int(ranks @ unit)
    remainder = low * values - np.floor(low * values)
    order = sorted(range(len(names)), key=lambda i: (-remainder[i], -values[i], i))
    added = True
    while added:
        added = False
        for i in order:
            if ranks[i] < cap_array[i] and unit[i] <= left:
                ranks[i] += 1
                left -= int(unit[i])
                added = True
    result = {name: int(rank) for name, rank in zip(names, ranks)}
    assert trainable_params(result, modules) <= budget
    return result
