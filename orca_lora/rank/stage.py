"""Stage 2, gap and rank: D_i per block, then r_i from the IBP prior P(r | D_i) (DESIGN 6)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from orca_lora.align.stage import alignment_set, distance_options, source_tokens
from orca_lora.config import Stage1Config, Stage2Config
from orca_lora.data.tasks import TaskData
from orca_lora.files import write_text_atomic
from orca_lora.models.body import body_blocks
from orca_lora.rank.gap import block_gaps
from orca_lora.rank.select import ModuleShape, RankPrior, select_ranks, trainable_params

BODY_PREFIX = "body."  # module names in the composed OrcaModel


@dataclass
class GapResult:
    blocks: list[str]
    gaps: list[float]
    ranks: dict[str, int]  # OrcaModel module name -> LoRA rank
    alpha0: float | None  # None for stage2.allocation uniform
    trainable_params: int
    budget: int | None
    allocation: str = "ibp"


def adapted_module_shapes(body: nn.Module, targets: Sequence[str]) -> dict[str, ModuleShape]:
    """Every Linear inside a Swin block whose name matches a target pattern, with its block index."""
    patterns = [re.compile(pattern) for pattern in targets]
    shapes = {}
    for index, (block_name, block) in enumerate(body_blocks(body)):
        for name, module in block.named_modules():
            full = f"{BODY_PREFIX}{block_name}.{name}"
            if isinstance(module, nn.Linear) and any(p.search(full) for p in patterns):
                shapes[full] = ModuleShape(index, module.out_features, module.in_features)
    if not shapes:
        raise ValueError(f"stage3.targets {list(targets)} match no Linear inside the body's blocks")
    outside = [name for name, module in body.named_modules() if isinstance(module, nn.Linear)
               and f"{BODY_PREFIX}{name}" not in shapes and any(p.search(f"{BODY_PREFIX}{name}") for p in patterns)]
    if outside:
        raise ValueError(f"stage3.targets select {outside[0]}, a Linear outside the Swin blocks, which has no "
                         "block gap to set its rank; narrow the pattern to the blocks' modules")
    return shapes


def run(stage: Stage2Config, align: Stage1Config, rank: int, targets: Sequence[str], body: nn.Module,
        embedder: nn.Module, task: TaskData, source_images: Tensor, source_labels: Tensor, seed: int,
        directory: Path) -> GapResult:
    """Measure the gaps, choose the ranks, write `gaps.csv` and `ranks.json` into `directory`."""
    shapes = adapted_module_shapes(body, targets)
    target_x, target_y = alignment_set(task, stage.max_samples, align.n_pseudo_labels, seed)
    # the proxy is ordered class by class: a seeded random subset keeps every class
    chosen = torch.randperm(len(source_images), generator=torch.Generator().manual_seed(seed))[:stage.max_samples]
    with torch.no_grad():
        target = embedder(target_x)
    gaps = block_gaps(body, source_tokens(body, source_images[chosen]), target, stage.distance,
                      source_labels[chosen], target_y, **distance_options(stage.distance, align, seed))
    blocks = [name for name, _ in body_blocks(body)]
    if stage.allocation == "uniform":
        ranks = dict.fromkeys(shapes, rank)
        result = GapResult(blocks, gaps, ranks, None, trainable_params(ranks, shapes), None, "uniform")
        write_outputs(result, [rank] * len(blocks), directory)
        return result
    budget = trainable_params(dict.fromkeys(shapes, rank), shapes) if stage.match_uniform_budget else stage.budget
    alpha0 = stage.alpha0 if stage.alpha0 is not None else (None if budget else float(rank))
    prior = RankPrior(link=stage.link, decision=stage.decision, quantile=stage.quantile, r_min=stage.r_min,
                      r_max=stage.r_max, alpha0=alpha0, budget=budget, seed=seed)
    selection = select_ranks(gaps, shapes, prior)
    result = GapResult(blocks, gaps, dict(selection.ranks), float(selection.alpha0),
                       int(selection.trainable_params), budget)
    write_outputs(result, selection.block_ranks, directory)
    return result


def write_outputs(result: GapResult, block_ranks: Sequence[int], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i},{name},{gap:.6g},{r}\n"
                   for i, (name, gap, r) in enumerate(zip(result.blocks, result.gaps, block_ranks)))
    write_text_atomic(directory / "gaps.csv", "block,name,gap,rank\n" + rows)
    write_text_atomic(directory / "ranks.json", json.dumps(asdict(result), indent=2) + "\n")


def load_result(directory: Path) -> GapResult:
    return GapResult(**json.loads((directory / "ranks.json").read_text()))


def uniform_ranks(body: nn.Module, targets: Sequence[str], rank: int) -> dict[str, int]:
    """`stage2.enabled: false`: every adapted module gets the same rank (too large a rank is
    reported by `add_adapters`, naming the module)."""
    return {name: rank for name in adapted_module_shapes(body, targets)}


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
