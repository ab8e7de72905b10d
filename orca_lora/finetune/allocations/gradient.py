"""`gradient`: GoRA's gradient-driven rank allocation (He et al. 2025, "GoRA: Gradient-driven
Adaptive Low Rank Adaptation", section 3.2).

Before training, the adapted modules' frozen pretrained weights W_m receive the gradient
G_m = dL/dW_m of the task loss averaged over stage3.allocation_batches training batches, on the
model as it will train (stage 1's embedder in place, no adapters yet). Module m's importance is

    I_m = mean_ij |W_m,ij * G_m,ij|,

and the ranks are proportional to I_m under the parameter budget (`rank/budget.py`), within one
rank-1 component of it. Stage 3 then trains the configured method at those ranks.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from orca_lora.adapters.spec import get_method
from orca_lora.finetune.allocations import AllocationPlan, AllocationSetup, sample_batches
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.budget import proportional_ranks
from orca_lora.rank.select import trainable_params

log = logging.getLogger("orca_lora")


def gradient_importance(weights: Mapping[str, Tensor], gradients: Mapping[str, Tensor]) -> dict[str, float]:
    """I_m = mean_ij |W_ij G_ij| per module (GoRA eq. 6: the average of |W * G| over the weight's entries)."""
    return {name: float((weight.double() * gradients[name].double()).abs().mean()) for name, weight in weights.items()}


def averaged_gradients(model: nn.Module, names: Iterable[str], batches: list[tuple[Tensor, Tensor]],
                       loss_fn, output_transform: nn.Module, device: torch.device) -> dict[str, Tensor]:
    """dL/dW of each named Linear's weight, L = the mean over `batches` of each batch's mean task loss.
    The weights are frozen for training, so they take a gradient here only, and are frozen again after."""
    weights = {name: model.get_submodule(name).weight for name in names}
    flags = {name: weight.requires_grad for name, weight in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
        weight.grad = None
    try:
        for inputs, targets in batches:
            outputs = output_transform(model(inputs.to(device)))
            (loss_fn(outputs, targets.to(device)).mean() / len(batches)).backward()
        return {name: weight.grad.detach().clone() for name, weight in weights.items()}
    finally:
        for name, weight in weights.items():
            weight.grad = None
            weight.requires_grad_(flags[name])


@register_allocation("gradient", phase="stage3")
def allocate(setup: AllocationSetup) -> AllocationPlan:
    """GoRA ranks for the configured method (module docstring)."""
    model, task, request = setup.model.to(setup.device), setup.task, setup.request
    batches = sample_batches(task, setup.stage, setup.seed)
    gradients = averaged_gradients(model, setup.shapes, batches, task.loss, task.output_transform.to(setup.device),
                                   setup.device)
    # the embedder and head take gradients too; they must not carry them into training
    model.zero_grad(set_to_none=True)
    weights = {name: model.get_submodule(name).weight.detach() for name in setup.shapes}
    importance = gradient_importance(weights, gradients)
    ranks = proportional_ranks(importance, setup.shapes, request.budget, request.r_min, request.r_max)
    log.info("stage3: gradient (GoRA) importance over %d batches: %s; ranks %s cost %d of the budget %d parameters",
             len(batches), ", ".join(f"{name} {value:.3g}" for name, value in importance.items()),
             list(ranks.values()), trainable_params(ranks, setup.shapes), request.budget)
    return AllocationPlan(ranks, get_method(setup.stage.method))
