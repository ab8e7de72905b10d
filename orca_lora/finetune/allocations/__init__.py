"""Rank allocations that need the training model (phase "stage3"): they run in stage 3's setup, on
the model as it will train (stage 1's embedder in place, no adapters yet), and hand stage 3 the
ranks and the method spec that puts the layers in.

- `gradient` (GoRA, He et al. 2025): ranks ~ |W * dL/dW| of each adapted frozen weight;
- `eva` (Paischer et al. 2024): PEFT's EVA ranks and its lora_A initialisation;
- `adalora` (Zhang et al. 2023): PEFT's AdaLoRA, whose ranks shrink while training.

Each meets the parameter budget stage 2 wrote into `ranks.json` (trainable adapter parameters
sum_m r_m (d_out + d_in)); stage 3 writes the ranks of the model it tested to `stage3/ranks.json`
(`RunFiles.training_ranks`), leaving stage 2's files as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from orca_lora.adapters.inject import adapter_modules
from orca_lora.adapters.spec import MethodSpec
from orca_lora.config import Stage3Config
from orca_lora.data.tasks import TaskData
from orca_lora.rank.allocations import get_allocation
from orca_lora.rank.select import ModuleShape, trainable_params
from orca_lora.records import GapResult



@dataclass(frozen=True)
class AllocationRequest:
    """What stage 2 passes on for a stage-3 allocation: its name, the parameter budget, and the rank
    bounds every module's rank stays within (stage2.r_min, stage2.r_max)."""

    name: str
    budget: int
    r_min: int
    r_max: int


@dataclass
class AllocationSetup:
    """What a stage-3 allocation reads: the model as it will train (no adapters yet), the task, the
    adapted modules' shapes, the request, the training seed, the number of optimizer steps stage 3
    takes, and the device it trains on (where the allocation's forward passes run)."""

    model: nn.Module
    task: TaskData
    stage: Stage3Config
    shapes: dict[str, ModuleShape]
    request: AllocationRequest
    seed: int
    total_steps: int
    device: torch.device


@dataclass
class AllocationPlan:
    """An allocation's answer: module -> rank the model starts training with (0: no adapter), and the
    spec whose `prepare` puts those layers in and whose hooks join the training loop."""

    ranks: dict[str, int]
    method: MethodSpec


def plan_allocation(setup: AllocationSetup) -> AllocationPlan:
    """Run the requested allocation on `setup` (before any adapter is in the model)."""
    allocation = get_allocation(setup.request.name)  # imports only that allocation's module
    if allocation.phase != "stage3":
        raise KeyError(f"stage2.allocation: {allocation.name!r} runs in {allocation.phase}, not in stage 3")
    return allocation.allocate(setup)


def tested_ranks(model: nn.Module, shapes: Mapping[str, ModuleShape]) -> dict[str, int]:
    """module -> rank of its adapter in `model`, 0 for an adapted module left without one."""
    layers = adapter_modules(model)
    return {name: layers[name].rank if name in layers else 0 for name in shapes}


def ranks_record(ranks: Mapping[str, int], shapes: Mapping[str, ModuleShape], request: AllocationRequest) -> GapResult:
    """The `ranks.json` form of stage-3 ranks: no gaps (stage 2's files hold them), the cost in our unit."""
    return GapResult([], None, dict(ranks), None, trainable_params(ranks, shapes), request.budget, request.name)


def sample_batches(task: TaskData, stage: Stage3Config, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The first stage3.allocation_batches shuffled training batches of stage3.batch_size, drawn from
    their own generator seeded with `seed`, so training's own shuffle is not moved by them."""
    loader = DataLoader(task.train, batch_size=stage.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = []
    for batch in loader:
        if len(batches) == stage.allocation_batches:
            break
        batches.append((batch[0], batch[1]))
    return batches
