"""`depth-increasing` / `depth-decreasing`: rank proportional to a block's depth, a gap-free baseline
for the shape of a gap profile (README, "Allocations against the field").

Score of every adapted module in block i (0-based, of n blocks): i + 1 (increasing) or n - i
(decreasing); ranks ~ scores at the budget by `proportional_ranks` (`rank/budget.py`).
"""
from __future__ import annotations

from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs, block_mean_ranks
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.budget import proportional_ranks


def depth_scores(blocks: dict[str, int], n_blocks: int, increasing: bool) -> dict[str, float]:
    """Module -> i + 1 (increasing) or n_blocks - i (decreasing), i its block's index."""
    return {name: float(block + 1 if increasing else n_blocks - block) for name, block in blocks.items()}


def depth_ranks(inputs: GapAllocationInputs, increasing: bool) -> AllocationResult:
    n_blocks, budget, stage = len(inputs.measured), inputs.required_budget(), inputs.stage
    blocks = {name: shape.block for name, shape in inputs.shapes.items()}
    ranks = proportional_ranks(depth_scores(blocks, n_blocks, increasing), inputs.shapes, budget, stage.r_min,
                               stage.r_max)
    return AllocationResult(ranks, block_mean_ranks(ranks, inputs.shapes, n_blocks), budget)


@register_allocation("depth-increasing", "stage2")
def depth_increasing(inputs: GapAllocationInputs) -> AllocationResult:
    return depth_ranks(inputs, increasing=True)


@register_allocation("depth-decreasing", "stage2")
def depth_decreasing(inputs: GapAllocationInputs) -> AllocationResult:
    return depth_ranks(inputs, increasing=False)
