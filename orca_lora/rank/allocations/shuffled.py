"""`shuffled`: does the placement of rank by gap matter, or only its non-uniformity?
(README, "Allocations against the field")

The `gap` rule applied to the blocks' gaps in a seeded random order: block i takes the gap of block
pi(i), pi a permutation drawn from the run's training seed, and then everything `gap` does follows
unchanged (stage2.link, the absolute reference, alpha_0 given or fitted to the same budget). Under the
per-block-floor reference a gap moves together with its floor, so what is permuted is x_i = D_i / D_ref_i
and the mass profile g(x_i) is a permutation of `gap`'s.

The gaps are permuted, not `gap`'s final ranks: blocks differ in width (a rank costs d_out + d_in per
module), so moving a rank from a narrow block to a wide one changes the parameter count, while
permuted gaps go through the same budget fit and meet the budget as `gap` does. On a body whose blocks
all have the same module shapes the block ranks are then a permutation of `gap`'s.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import numpy as np

from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs
from orca_lora.rank.allocations.ibp_prior import absolute_reference, prior_ranks, stage_prior
from orca_lora.rank.allocations.registry import register_allocation

log = logging.getLogger("orca_lora")


def block_permutation(n_blocks: int, seed: int) -> list[int]:
    """pi: block i takes block pi[i]'s gap; numpy's PCG64 permutation drawn from `seed`."""
    return [int(index) for index in np.random.default_rng(seed).permutation(n_blocks)]


def permuted(values: float | Sequence[float], order: Sequence[int]) -> float | list[float]:
    """values[order[i]] for every block i; a scalar (one constant reference for all blocks) unchanged."""
    if isinstance(values, (int, float)):
        return values
    return [values[index] for index in order]


@register_allocation("shuffled", "stage2")
def shuffled(inputs: GapAllocationInputs) -> AllocationResult:
    order = block_permutation(len(inputs.measured), inputs.seed)
    log.info("stage2: shuffled allocation, block i takes the gap of block order[i] = %s (seed %d)", order, inputs.seed)
    reference = permuted(absolute_reference(inputs.stage, inputs.measured), order)
    prior = replace(stage_prior(inputs), reference=reference)
    return prior_ranks(inputs, permuted(list(inputs.corrected), order), prior)
