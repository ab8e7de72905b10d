"""`uniform`: stage3.rank in every adapted module (stage3.block_ranks in place of it in the blocks it names). Stage 2 still measures and writes the gaps, so a
uniform run sits beside gap-aware ones in the same tables; no budget, no IBP mass."""
from __future__ import annotations

from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.select import block_uniform_ranks


@register_allocation("uniform", "stage2")
def uniform(inputs: GapAllocationInputs) -> AllocationResult:
    rank, overrides = inputs.uniform_rank, inputs.block_ranks
    return AllocationResult(block_uniform_ranks(inputs.shapes, rank, overrides),
                            [overrides.get(block, rank) for block in range(len(inputs.measured))], budget=None)
