"""Stage-2 allocation inputs built by hand (tests/rank/allocations/): measured gaps with floors, module
shapes, no training."""
from typing import Mapping, Sequence

from torch import nn

from orca_lora.config import Stage2Config
from orca_lora.rank.allocations.context import GapAllocationInputs
from orca_lora.rank.gap import BlockGap
from orca_lora.rank.null import GapEstimate, corrected_gap
from orca_lora.rank.select import ModuleShape, trainable_params

GAPS = (0.9, 0.2, 2.5, 0.6)  # as measured, one per block
FLOORS = (0.1, 0.05, 0.3, 0.2)


def measured_blocks(gaps: Sequence[float] = GAPS, floors: Sequence[float] = FLOORS) -> list[BlockGap]:
    return [BlockGap(f"layers.{i // 2}.blocks.{i % 2}", 16, GapEstimate(gap, floor, 0.001, gap - 0.1, gap + 0.1))
            for i, (gap, floor) in enumerate(zip(gaps, floors))]


def swin_like_shapes(widths: Sequence[int]) -> dict[str, ModuleShape]:
    """qkv, proj, fc1 and fc2 of one Swin block per width, as `adapted_module_shapes` names them."""
    shapes = {}
    for block, width in enumerate(widths):
        prefix = f"body.layers.{block // 2}.blocks.{block % 2}"
        shapes.update({f"{prefix}.attn.qkv": ModuleShape(block, 3 * width, width),
                       f"{prefix}.attn.proj": ModuleShape(block, width, width),
                       f"{prefix}.mlp.fc1": ModuleShape(block, 4 * width, width),
                       f"{prefix}.mlp.fc2": ModuleShape(block, width, 4 * width)})
    return shapes


def make_inputs(shapes: Mapping[str, ModuleShape], body: nn.Module | None = None, seed: int = 0,
                measured: Sequence[BlockGap] | None = None, **stage2) -> GapAllocationInputs:
    measured = measured_blocks() if measured is None else list(measured)
    stage = Stage2Config(**{"r_max": 16, **stage2})
    corrected = [corrected_gap(block.estimate) for block in measured]
    return GapAllocationInputs(stage, measured, corrected, dict(shapes), 4, seed, body or nn.Identity())


def assert_meets_budget(ranks: Mapping[str, int], shapes: Mapping[str, ModuleShape], budget: int) -> None:
    """cost <= budget and budget - cost < the largest rank-1 component."""
    cost = trainable_params(ranks, shapes)
    assert cost <= budget
    assert budget - cost < max(shape.d_out + shape.d_in for shape in shapes.values())
