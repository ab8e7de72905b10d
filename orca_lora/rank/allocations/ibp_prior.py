"""The IBP-prior allocations (IBP: Griffiths & Ghahramani 2005/2011; README, "P(r | D)"):
block i's mass alpha_i = alpha_0 g(x_i), its rank
the decision on Poisson(alpha_i) truncated to [r_min, min(r_max, d_out, d_in)] (`rank/select.py`).

- `gap-relative`: x_i = D_i / mean_j D_j, a within-task allocation, blind to the gaps' overall scale;
- `gap`: x_i = D_i / D_ref, D_ref = stage2.gap_reference or block i's noise floor (absolute: a larger
  gap gets more rank);
- `flat`: alpha_i = alpha_0 in every block, whatever its gap.

alpha_0 is stage2.alpha0, or fitted to the budget (stage2.budget, or uniform stage3.rank's cost under
stage2.match_uniform_budget), or else stage3.rank. D_i is always the floor-corrected gap.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from orca_lora.config import Stage2Config
from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.gap import BlockGap
from orca_lora.rank.select import RankPrior, select_ranks


def stage_prior(inputs: GapAllocationInputs) -> RankPrior:
    """The RankPrior of stage2's link, decision and rank range; alpha_0 given, fitted to the budget,
    or stage3.rank. Relative to the mean gap (reference None) and not flat: callers replace those."""
    stage, budget = inputs.stage, inputs.budget
    alpha0 = stage.alpha0 if stage.alpha0 is not None else (None if budget else float(inputs.uniform_rank))
    return RankPrior(link=stage.link, decision=stage.decision, quantile=stage.quantile, r_min=stage.r_min,
                     r_max=stage.r_max, alpha0=alpha0, budget=budget, seed=inputs.seed)


def prior_ranks(inputs: GapAllocationInputs, gaps: Sequence[float], prior: RankPrior) -> AllocationResult:
    """`select_ranks` on per-block gaps (or rates), with each module's block mass alpha_i recorded."""
    selection = select_ranks(gaps, inputs.shapes, prior)
    masses = {name: selection.block_alpha[shape.block] for name, shape in inputs.shapes.items()}
    return AllocationResult(dict(selection.ranks), list(selection.block_ranks), prior.budget,
                            float(selection.alpha0), masses)


def absolute_reference(stage: Stage2Config, measured: Sequence[BlockGap]) -> float | list[float]:
    """D_ref of the absolute link: stage2.gap_reference, or each block's noise floor."""
    if stage.gap_reference is not None:
        return stage.gap_reference
    floors = [block.estimate.floor for block in measured]
    if min(floors) <= 0:
        zero = next(block.name for block in measured if block.estimate.floor <= 0)
        raise ValueError(f"stage2.allocation {stage.allocation} divides each gap by its block's noise floor, but "
                         f"{zero}'s floor under {stage.distance} is {min(floors):.3g}; set stage2.gap_reference to "
                         "a constant in the distance's units (e.g. 1 for spectral, a rank)")
    return floors


@register_allocation("gap-relative", "stage2")
def gap_relative(inputs: GapAllocationInputs) -> AllocationResult:
    return prior_ranks(inputs, inputs.corrected, stage_prior(inputs))


@register_allocation("gap", "stage2")
def gap(inputs: GapAllocationInputs) -> AllocationResult:
    prior = replace(stage_prior(inputs), reference=absolute_reference(inputs.stage, inputs.measured))
    return prior_ranks(inputs, inputs.corrected, prior)


@register_allocation("flat", "stage2")
def flat(inputs: GapAllocationInputs) -> AllocationResult:
    return prior_ranks(inputs, inputs.corrected, replace(stage_prior(inputs), flat=True))
