"""`stable-rank`: ranks proportional to the stable rank of each frozen pretrained weight, data-free
(SR-LoRA: Zhang et al. 2025, arXiv:2507.00327).

Score of adapted module m with pretrained weight W_m: its stable rank ||W_m||_F^2 / ||W_m||_2^2
(`stable_rank`); ranks ~ scores at the budget by `proportional_ranks` (`rank/budget.py`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from orca_lora.models.model import BODY_PREFIX
from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs, block_mean_ranks
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.budget import proportional_ranks


def stable_rank(weight: Tensor) -> float:
    """srank(W) = ||W||_F^2 / ||W||_2^2 = sum_k s_k^2 / s_1^2 for singular values s_1 >= s_2 >= ...;
    in [1, rank(W)], a noise-robust rank (Rudelson & Vershynin 2007; SR-LoRA, Zhang et al. 2025)."""
    if weight.ndim != 2:
        raise ValueError(f"stable_rank takes a matrix, got a tensor of shape {tuple(weight.shape)}")
    matrix = weight.detach().to(torch.float64)
    spectral = float(torch.linalg.matrix_norm(matrix, ord=2))
    if not spectral > 0:
        raise ValueError("stable_rank of a zero matrix is undefined (0 / 0)")
    return float(torch.linalg.matrix_norm(matrix, ord="fro")) ** 2 / spectral ** 2


def pretrained_weight(body: nn.Module, module: str) -> Tensor:
    """The frozen weight of adapted module `module` (an OrcaModel name, `body.layers.0.blocks.0.attn.qkv`)."""
    if not module.startswith(BODY_PREFIX):
        raise ValueError(f"adapted module {module!r} is not inside the body (no {BODY_PREFIX!r} prefix)")
    return body.get_submodule(module[len(BODY_PREFIX):]).weight


@register_allocation("stable-rank", "stage2")
def stable_rank_allocation(inputs: GapAllocationInputs) -> AllocationResult:
    budget, stage = inputs.required_budget(), inputs.stage
    scores = {name: stable_rank(pretrained_weight(inputs.body, name)) for name in inputs.shapes}
    ranks = proportional_ranks(scores, inputs.shapes, budget, stage.r_min, stage.r_max)
    return AllocationResult(ranks, block_mean_ranks(ranks, inputs.shapes, len(inputs.measured)), budget)
