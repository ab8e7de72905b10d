"""Stage 2, gap and rank: D_i per block, then r_i from the registered stage2.allocation (README, "Stage 2: gap and rank";
`rank/allocations/`)."""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from orca_lora.align.distances import distance_options
from orca_lora.config import Stage2Config
from orca_lora.data.tasks import TaskData
from orca_lora.models.body import body_blocks
from orca_lora.models.features import labelled_target_sample, source_tokens
from orca_lora.models.model import BODY_PREFIX
from orca_lora.rank.allocations import get_allocation
from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs
from orca_lora.rank.calibration_store import CalibrationDirectory
from orca_lora.rank.gap import BlockGap, GapSettings, block_gaps
from orca_lora.rank.null import GapEstimate, corrected_gap
from orca_lora.rank.select import ModuleShape, block_uniform_ranks, trainable_params
from orca_lora.rank.spectral import check_sample_sizes
from orca_lora.records import GapResult, GapRow
from orca_lora.run_files import EMBEDDER_PROJECTION, RunFiles, write_gaps, write_ranks

log = logging.getLogger("orca_lora")

@dataclass
class GapInputs:
    """What stage 2 measures on: the frozen body, the aligned embedder, the held-out source and
    target samples (`task.train` holds only the target's held-out part), and the adapted modules'
    names with the uniform rank the ranks are compared to (stage3.rank)."""

    body: nn.Module
    embedder: nn.Module
    task: TaskData
    source_images: Tensor
    source_labels: Tensor
    targets: Sequence[str]
    uniform_rank: int
    seed: int  # the training seed: a sampled rank decision draws from it
    measure_seed: int  # the data seed: the target sample, its pseudo-labels, the null and interval draws
    calibrations: Optional[Path] = None  # a folder for the spectral gap's data-free null simulations
    block_ranks: Mapping[int, int] = field(default_factory=dict)  # stage3.block_ranks: uniform rank overrides


def adapted_module_shapes(body: nn.Module, targets: Sequence[str]) -> dict[str, ModuleShape]:
    """Every Linear inside a Swin block whose name matches a target pattern, with its block index; and
    the embedder's projection when a pattern selects `embedder.proj`. That conv is a Linear map of
    patch vectors (d_in = C p^2, with the body's patch-embedding shape: LoRA there needs a task with the
    body's channels) and counts as block 0's (`run_files.module_block`), whose gap D_0 measures its output."""
    patterns = [re.compile(pattern) for pattern in targets]
    shapes = {}
    if any(p.search(EMBEDDER_PROJECTION) for p in patterns):
        weight = body.patch_embed.proj.weight
        shapes[EMBEDDER_PROJECTION] = ModuleShape(0, weight.shape[0], weight[0].numel())
    for index, (block_name, block) in enumerate(body_blocks(body)):
        for name, module in block.named_modules():
            full = f"{BODY_PREFIX}{block_name}.{name}"
            if isinstance(module, nn.Linear) and any(p.search(full) for p in patterns):
                shapes[full] = ModuleShape(index, module.out_features, module.in_features)
    if not shapes:
        raise ValueError(f"stage3.targets {list(targets)} match no Linear inside the body's blocks, nor "
                         f"{EMBEDDER_PROJECTION}")
    outside = [name for name, module in body.named_modules() if isinstance(module, nn.Linear)
               and f"{BODY_PREFIX}{name}" not in shapes and any(p.search(f"{BODY_PREFIX}{name}") for p in patterns)]
    if outside:
        raise ValueError(f"stage3.targets select {outside[0]}, a Linear outside the Swin blocks, which has no "
                         "block gap to set its rank; narrow the pattern to the blocks' modules")
    return shapes


# Stage2Config fields that choose ranks from the gaps; every other field changes what is measured
ALLOCATION_FIELDS = ("allocation", "gap_reference", "law", "posterior_run", "link", "decision", "quantile", "r_min",
                     "r_max", "alpha0", "budget", "match_uniform_budget")


def run(stage: Stage2Config, inputs: GapInputs, run_files: RunFiles,
        measured: Sequence[BlockGap] | None = None) -> GapResult:
    """Measure the gaps on the held-out samples (or take `measured`, the same measurement made earlier),
    choose the ranks with the registered stage2.allocation, write `gaps.csv` and `ranks.json`. A stage-3
    allocation (it needs the training model) gets the uniform stage3.rank here and the budget it must meet
    (`GapResult`)."""
    shapes = adapted_module_shapes(inputs.body, inputs.targets)
    measured = measure_gaps(stage, inputs) if measured is None else measured
    corrected = [corrected_gap(block.estimate) for block in measured]
    context = GapAllocationInputs(stage, measured, corrected, shapes, inputs.uniform_rank, inputs.seed, inputs.body,
                                  dict(inputs.block_ranks))
    allocation = get_allocation(stage.allocation)
    if allocation.phase == "stage2":
        chosen = allocation.allocate(context)
    else:
        rank = inputs.uniform_rank
        chosen = AllocationResult(dict.fromkeys(shapes, rank), [rank] * len(measured), context.budget)
    result = GapResult([block.name for block in measured], [block.estimate.gap for block in measured], chosen.ranks,
                       chosen.alpha0, trainable_params(chosen.ranks, shapes), chosen.budget, stage.allocation,
                       corrected, chosen.prior_masses)
    adapted_blocks = {shape.block for shape in shapes.values()}
    block_ranks = [rank if index in adapted_blocks else 0 for index, rank in enumerate(chosen.block_ranks)]
    write_outputs(result, measured, block_ranks, run_files)
    return result


def measure_gaps(stage: Stage2Config, inputs: GapInputs) -> list[BlockGap]:
    """D_i, its floor, p-value and interval at every block's input, source against aligned target."""
    body = inputs.body
    target_x, target_y = labelled_target_sample(inputs.task, stage.max_samples, stage.n_pseudo_labels,
                                                inputs.measure_seed)
    with torch.no_grad():
        target = inputs.embedder(target_x)
    options = distance_options(stage.distance, stage.otdd_inner, stage.entropic_reg, inputs.measure_seed,
                               stage.sinkhorn_tolerance, stage.sinkhorn_max_iters)
    settings = GapSettings(stage.distance, stage.permutations, stage.bootstraps, seed=inputs.measure_seed,
                           options=options,
                           calibrations=None if inputs.calibrations is None else CalibrationDirectory(inputs.calibrations))
    measured = block_gaps(body, source_tokens(body, inputs.source_images), target, settings,
                          inputs.source_labels, target_y)
    for block in measured:
        e = block.estimate
        log.info("stage2: %s (width %d): %s %.4g, floor %.4g, p %.3g, 95%% interval [%.4g, %.4g]", block.name,
                 block.width, stage.distance, e.gap, e.floor, e.p_value, e.ci_low, e.ci_high)
    return measured


def measured_record(measured: Sequence[BlockGap]) -> list[dict]:
    """`measured` as JSON-ready values (`measured_from_record` reads them back)."""
    return [asdict(block) for block in measured]


def measured_from_record(record: Sequence[Mapping]) -> list[BlockGap]:
    return [BlockGap(block["name"], block["width"], GapEstimate(**block["estimate"])) for block in record]


def write_outputs(result: GapResult, measured: Sequence[BlockGap], block_ranks: Sequence[int],
                  run_files: RunFiles) -> None:
    rows = [GapRow(i, block.name, block.width, block.estimate.gap, block.estimate.floor, block.estimate.p_value,
                   block.estimate.ci_low, block.estimate.ci_high, corrected, rank)
            for i, (block, corrected, rank) in enumerate(zip(measured, result.corrected_gaps, block_ranks))]
    write_gaps(run_files, rows)
    write_ranks(run_files, result)


def explicit_ranks(body: nn.Module, targets: Sequence[str], rank: int, rank_map: Mapping[str, int],
                   run_files: RunFiles, block_ranks: Mapping[int, int] | None = None) -> GapResult:
    """Stage 2 switched off: `stage3.rank_map`, or `stage3.rank` for every adapted module (`block_ranks`
    in place of it in the blocks it names), written to `ranks.json` like measured ranks (no gaps)."""
    shapes = adapted_module_shapes(body, targets)
    ranks = dict(rank_map) or uniform_ranks(body, targets, rank, block_ranks)
    counted = trainable_params(ranks, {name: shapes[name] for name in ranks})
    result = GapResult([], None, ranks, None, counted, None, "explicit")
    write_ranks(run_files, result)
    return result


def check_gap_sample_sizes(body: nn.Module, stage: Stage2Config) -> None:
    """Before stage 1: the spectral gap needs stage2.max_samples >= 4 x the widest block's width."""
    if stage.enabled and stage.distance == "spectral":
        widest = max(int(block.dim) for _, block in body_blocks(body))
        check_sample_sizes(stage.max_samples, stage.max_samples, widest)


def uniform_ranks(body: nn.Module, targets: Sequence[str], rank: int,
                  block_ranks: Mapping[int, int] | None = None) -> dict[str, int]:
    """`stage2.enabled: false`: every adapted module gets the same rank, or its block's entry of
    `block_ranks` (too large a rank is reported by `add_adapters`, naming the module)."""
    return block_uniform_ranks(adapted_module_shapes(body, targets), rank, block_ranks or {})


def check_block_ranks(body: nn.Module, targets: Sequence[str], block_ranks: Mapping[int, int]) -> None:
    """Fail before any training when `stage3.block_ranks` names a block the body does not have, or a
    rank above one of that block's adapted weights."""
    shapes = adapted_module_shapes(body, targets)
    n_blocks = len(body_blocks(body))
    for block, rank in block_ranks.items():
        if not 0 <= block < n_blocks:
            raise ValueError(f"stage3.block_ranks: block {block} does not exist; the body has blocks 0 to "
                             f"{n_blocks - 1} (the rows of gaps.csv)")
        for name, shape in shapes.items():
            if shape.block == block and rank > min(shape.d_out, shape.d_in):
                raise ValueError(f"stage3.block_ranks: rank {rank} for block {block} is above min(d_out, d_in) = "
                                 f"{min(shape.d_out, shape.d_in)} of {name}")


def check_rank_map(body: nn.Module, targets: Sequence[str], rank_map: Mapping[str, int]) -> None:
    """Fail before any training when an explicit rank map names a module the targets do not adapt."""
    shapes = adapted_module_shapes(body, targets)
    for name, rank in rank_map.items():
        if name not in shapes:
            close = [known for known in shapes if known.endswith(name.split(".")[-1])][:3]
            raise KeyError(f"stage3.rank_map: {name!r} is not an adapted module; names look like "
                           f"{', '.join(close or list(shapes)[:3])}")
        shape = shapes[name]
        if not 1 <= rank <= min(shape.d_out, shape.d_in):
            raise ValueError(f"stage3.rank_map: rank {rank} for {name} must be in [1, "
                             f"{min(shape.d_out, shape.d_in)}] (its weight is {shape.d_out} x {shape.d_in})")
