"""`law`: block masses from a fitted rank law (README, "P(r | D)"; `orca-lora calibrate`).

Block i's rate lambda_i = c x_i^beta, x_i = 1 + corrected_i / floor_i, is its IBP mass directly
(alpha_0 = 1 on the identity link with D_ref = 1); its rank is the stage2.decision on Poisson(lambda_i)
truncated to [r_min, min(r_max, d_out, d_in)]. A law sets the ranks itself: no budget.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs
from orca_lora.rank.allocations.ibp_prior import prior_ranks, stage_prior
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.gap import BlockGap
from orca_lora.rank.law import floor_units
from orca_lora.rank.law_file import read_law_file
from orca_lora.rank.null import corrected_gap

log = logging.getLogger("orca_lora")


def law_rates(path: str, measured: Sequence[BlockGap]) -> list[float]:
    """lambda_i = c x_i^beta of a fitted rank law (`orca-lora calibrate`), x_i = 1 + corrected / floor."""
    law = read_law_file(path).law
    rates = [float(law.rate(floor_units(corrected_gap(block.estimate), block.estimate.floor))) for block in measured]
    log.info("stage2: ranks from the law in %s (beta %.3g, c %.3g): block rates %s", path, law.beta, law.c,
             ", ".join(f"{rate:.3g}" for rate in rates))
    return rates


@register_allocation("law", "stage2")
def law(inputs: GapAllocationInputs) -> AllocationResult:
    if inputs.stage.law is None:
        raise ValueError("stage2.allocation law reads its rates from stage2.law; set it to a rank_law.json")
    prior = replace(stage_prior(inputs), link="linear", alpha0=1.0, reference=1.0)
    return prior_ranks(inputs, law_rates(inputs.stage.law, inputs.measured), prior)
