"""`uniform`: stage3.rank in every adapted module. Stage 2 still measures and writes the gaps, so a
uniform run sits beside gap-aware ones in the same tables; no budget, no IBP mass."""
from __future__ import annotations

from orca_lora.rank.allocations import register_allocation
from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs


@register_allocation("uniform", "stage2")
def uniform(inputs: GapAllocationInputs) -> AllocationResult:
    rank = inputs.uniform_rank
    return AllocationResult(dict.fromkeys(inputs.shapes, rank), [rank] * len(inputs.measured), budget=None)
