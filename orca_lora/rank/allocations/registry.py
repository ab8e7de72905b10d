"""The allocation registry itself: `register_allocation(name, phase)` files an allocation function
(timm's `register_model` pattern). Kept apart from the package's `__init__`, which imports every
stage-2 allocation module, so that those modules import this one and not their own package."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

PHASES = ("stage2", "stage3")


@dataclass(frozen=True)
class Allocation:
    name: str
    phase: str  # "stage2" or "stage3"
    # stage2: (context.GapAllocationInputs) -> context.AllocationResult, called by rank/stage.py's `run`;
    # stage3: called by stage 3's setup, never by stage 2 (which writes uniform ranks and the budget)
    allocate: Callable[..., Any]


ALLOCATIONS: dict[str, Allocation] = {}


def register_allocation(name: str, phase: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """File the decorated function under `name`, to run in `phase`."""
    if phase not in PHASES:
        raise ValueError(f"allocation phase must be one of {PHASES}, got {phase!r}")

    def add(allocate: Callable[..., Any]) -> Callable[..., Any]:
        ALLOCATIONS[name] = Allocation(name, phase, allocate)
        return allocate
    return add
