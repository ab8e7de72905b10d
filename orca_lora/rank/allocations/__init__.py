"""Rank allocations: how `stage2.allocation` gives every adapted module its LoRA rank
(README, "Allocations against the field").

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

import importlib

from orca_lora.choices import RANK_ALLOCATIONS, TRAINING_ALLOCATIONS, check_registry
from orca_lora.rank.allocations.registry import ALLOCATIONS, Allocation, register_allocation  # noqa: F401


def get_allocation(name: str) -> Allocation:
    """The registered allocation `name`. The stage-2 modules are imported on first use; a stage-3
    allocation's module only when it is asked for (eva and adalora import PEFT, ~7 s)."""
    _load_stage2()
    if name in TRAINING_ALLOCATIONS:
        importlib.import_module(f"orca_lora.finetune.allocations.{name}")
    if name not in ALLOCATIONS:
        raise KeyError(f"stage2.allocation: {name!r} is not one of {', '.join(RANK_ALLOCATIONS)}")
    return ALLOCATIONS[name]


def check_allocations() -> None:
    """Import every allocation module and check the registry against choices.py (the tests call it)."""
    _load_stage2()
    for name in TRAINING_ALLOCATIONS:
        importlib.import_module(f"orca_lora.finetune.allocations.{name}")
    check_registry("allocation", ALLOCATIONS, RANK_ALLOCATIONS)
    wrong = [name for name in TRAINING_ALLOCATIONS if ALLOCATIONS[name].phase != "stage3"]
    if wrong:
        raise RuntimeError(f"{wrong} are listed in choices.TRAINING_ALLOCATIONS but registered for stage 2")


def _load_stage2() -> None:
    from orca_lora.rank.allocations import (depth, ibp_posterior, ibp_prior, law, shuffled,  # noqa: F401
                                            stable_rank, uniform)
    stage2 = [name for name, allocation in ALLOCATIONS.items() if allocation.phase == "stage2"]
    check_registry("stage-2 allocation", stage2, [n for n in RANK_ALLOCATIONS if n not in TRAINING_ALLOCATIONS])
