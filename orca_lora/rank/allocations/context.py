"""What a stage-2 allocation receives and returns (README, "P(r | D)" and "Allocations against the field").

`rank/stage.py` measures the gaps, builds one `GapAllocationInputs` and calls the registered
allocation; the allocation returns an `AllocationResult`, from which stage 2 writes `ranks.json`
(`GapResult`) and the rank column of `gaps.csv`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from torch import nn

from orca_lora.config import Stage2Config
from orca_lora.rank.gap import BlockGap
from orca_lora.rank.select import ModuleShape, trainable_params


@dataclass(frozen=True)
class GapAllocationInputs:
    """Stage 2's measurements and the adapted modules, as every stage-2 allocation reads them."""

    stage: Stage2Config
    measured: Sequence[BlockGap]  # one per Swin block, forward order
    corrected: Sequence[float]  # max(D_i - floor_i, 0), 0 where p >= 0.05: what gap-driven ranks use
    shapes: Mapping[str, ModuleShape]  # adapted module name -> its block and weight shape
    uniform_rank: int  # stage3.rank
    seed: int  # the run's training seed (a sampled rank decision, the shuffled permutation)
    body: nn.Module  # the frozen source body (data-free scores read its pretrained weights)
    block_ranks: Mapping[int, int] = field(default_factory=dict)  # stage3.block_ranks (uniform only)

    @property
    def budget(self) -> Optional[int]:
        """Adapter parameters sum_m r_m (d_out + d_in) to meet: what uniform stage3.rank costs under
        stage2.match_uniform_budget, else stage2.budget (None: no budget)."""
        if self.stage.match_uniform_budget:
            return trainable_params(dict.fromkeys(self.shapes, self.uniform_rank), self.shapes)
        return self.stage.budget

    def required_budget(self) -> int:
        """The budget of an allocation that scales scores to it; config_load.validate refuses such a config
        without one, so this only fails for inputs built by hand."""
        if self.budget is None:
            raise ValueError(f"stage2.allocation {self.stage.allocation!r} scales its scores to a parameter budget; "
                             "set stage2.budget or stage2.match_uniform_budget=true")
        return self.budget


@dataclass(frozen=True)
class AllocationResult:
    """ranks: module -> LoRA rank. block_ranks[i]: block i's rank for `gaps.csv` (the IBP decision's rank
    for the prior-based allocations; for the others see `block_mean_ranks`). alpha0 and prior_masses
    (module -> its block's IBP mass alpha_i) only for allocations that use the IBP prior."""

    ranks: dict[str, int]
    block_ranks: list[int]
    budget: Optional[int]
    alpha0: Optional[float] = None
    prior_masses: Optional[dict[str, float]] = None


def block_mean_ranks(ranks: Mapping[str, int], shapes: Mapping[str, ModuleShape], n_blocks: int) -> list[int]:
    """Per block, the mean rank of its adapted modules, rounded half up; 0 for a block with none
    (an allocation whose ranks differ inside a block has no single block rank to report)."""
    totals, counts = [0] * n_blocks, [0] * n_blocks
    for name, shape in shapes.items():
        totals[shape.block] += ranks[name]
        counts[shape.block] += 1
    return [int(total / count + 0.5) if count else 0 for total, count in zip(totals, counts)]

