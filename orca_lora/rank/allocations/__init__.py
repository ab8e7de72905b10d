"""Rank allocations: how `stage2.allocation` gives every adapted module its LoRA rank (DESIGN 8).

One registry for all of them (timm's `register_model` pattern); each allocation lives in its own
module and registers itself with the phase it runs in:

- `stage2`: from what stage 2 has, the measured block gaps and the frozen body (uniform, the gap
  family, shuffled, depth, stable rank, IBP posterior ranks of other runs);
- `stage3`: allocations that need the training model (gradient importance, PEFT's EVA, PEFT's
  AdaLoRA) run in stage 3's setup, before training. Stage 2 still measures the gap.

Every allocation writes its ranks through the run-files contract into the same `ranks.json` form,
and every budgeted one meets the same unit: trainable adapter parameters sum_m r_m (d_out + d_in)
(`rank/budget.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from orca_lora.choices import RANK_ALLOCATIONS, check_registry

PHASES = ("stage2", "stage3")


@dataclass(frozen=True)
class Allocation:
    name: str
    phase: str  # "stage2" or "stage3"
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


def get_allocation(name: str) -> Allocation:
    """The registered allocation `name` (its modules are imported on first use)."""
    _load()
    if name not in ALLOCATIONS:
        raise KeyError(f"stage2.allocation: {name!r} is not one of {', '.join(sorted(ALLOCATIONS))}")
    return ALLOCATIONS[name]


def _load() -> None:
    # the phase-"stage3" allocations, which need the training model (and PEFT), live with stage 3
    from orca_lora.finetune.allocations import adalora, eva, gradient  # noqa: F401

    check_registry("allocation", ALLOCATIONS, RANK_ALLOCATIONS)
