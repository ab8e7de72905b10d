"""`eva`: Explained Variance Adaptation (Paischer et al. 2024, "One Initialization to Rule them All:
Fine-tuning via Explained Variance Adaptation"), through PEFT's own EVA code.

EVA runs an incremental SVD of each adapted module's inputs over training batches, initialises
lora_A with the top right-singular vectors and gives the rank budget sum_m r (EVA's unit: ranks) to
the components of largest explained-variance ratio across all modules; a module that wins none
keeps no adapter. Here PEFT does all of that (`get_peft_model(..., init_lora_weights="eva")`,
`initialize_lora_eva_weights`) on a deep copy of our model after stage 1; stage 3 then trains our
LoRA layers at EVA's ranks with lora_A copied from EVA's and B = 0, as EVA initialises them.

Budget in our unit (parameters sum_m r_m (d_out + d_in)), matched as faithfully as PEFT allows:
EVA is asked for r_eva = ceil(P / (n x min_m (d_out + d_in))) per module, a rank budget that costs
at least the parameter budget P however it is spread; its components are then taken in EVA's own
order, descending explained-variance ratio, each while it fits P and the module's cap
min(stage2.r_max, d_out, d_in) (a module's k-th component only after its (k-1)-th), which lands
short of P by less than one rank-1 component. The ratios are those of EVA's returned components on
the allocation batches' inputs (`explained_variance_ratios`). EVA's own ranks and ours are logged.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from typing import Mapping, Sequence

import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from orca_lora.adapters.inject import add_adapters, mark_only_adapters_trainable
from orca_lora.adapters.lora import LoRA
from orca_lora.adapters.spec import train_embedder_and_head
from orca_lora.config import Stage3Config
from orca_lora.finetune.allocations import AllocationPlan, AllocationSetup, sample_batches
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.budget import rank_caps
from orca_lora.rank.select import ModuleShape, trainable_params

log = logging.getLogger("orca_lora")


def explained_variance_ratios(covariance: Tensor, components: Tensor) -> list[float]:
    """u_k^T C u_k / (|u_k|^2 tr C) for each row u_k of `components`: the share of the inputs' total
    variance along u_k, the explained-variance ratio EVA ranks components by (C the inputs' covariance)."""
    rows = components.double()
    covariance = covariance.double()
    along = ((rows @ covariance) * rows).sum(dim=1) / (rows * rows).sum(dim=1)
    return (along / torch.trace(covariance)).tolist()


def budget_ranks(ratios: Mapping[str, Sequence[float]], shapes: Mapping[str, ModuleShape], budget: int,
                 caps: Mapping[str, int]) -> dict[str, int]:
    """Components in descending explained-variance ratio, each taken while it fits `budget` (parameters)
    and its module's cap; a module's ratios are made non-increasing (running minimum) so its k-th
    component never precedes its (k-1)-th. Short of the budget by less than one rank-1 component
    whenever some component is left out."""
    order = []
    for index, (name, values) in enumerate(ratios.items()):
        running = math.inf
        for k, value in enumerate(values):
            running = min(running, value)
            order.append((-running, index, k, name))
    ranks = dict.fromkeys(shapes, 0)
    left = budget
    for _, _, k, name in sorted(order):
        unit = shapes[name].d_out + shapes[name].d_in
        if ranks[name] == k and k < caps[name] and unit <= left:
            ranks[name] += 1
            left -= unit
    return ranks


def eva_rank_per_module(shapes: Mapping[str, ModuleShape], budget: int, rho: float) -> int:
    """r_eva = ceil(P / (n min_m (d_out + d_in))) (module docstring), lowered so that EVA's
    round(r_eva rho) components per module fit the narrowest module's input width."""
    cheapest = min(shape.d_out + shape.d_in for shape in shapes.values())
    wanted = math.ceil(budget / (len(shapes) * cheapest))
    widest_allowed = min(shape.d_in for shape in shapes.values())
    while wanted > 1 and round(wanted * rho) > widest_allowed:
        wanted -= 1
    return wanted


def peft_eva_components(model: nn.Module, names: Sequence[str], batches: list[tuple[Tensor, Tensor]],
                        stage: Stage3Config, rank: int) -> dict[str, Tensor]:
    """module -> EVA's lora_A (its rank x d_in), from PEFT's EVA on a deep copy of `model`; (0, d_in)
    for a module EVA gives rank 0 (PEFT puts its bare base layer back)."""
    twin = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=stage.alpha, target_modules=list(names), init_lora_weights="eva",
                        eva_config=EvaConfig(rho=stage.eva_rho, tau=stage.eva_tau))
    peft_model = get_peft_model(twin, config, low_cpu_mem_usage=True)  # EVA fills lora_A; no init to waste
    initialize_lora_eva_weights(peft_model, batches, forward_fn=lambda wrapped, batch: wrapped(batch[0]),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                show_progress_bar=False)
    components = {}
    for name in names:
        layer = twin.get_submodule(name)
        if isinstance(layer, LoraLayer):
            components[name] = layer.lora_A["default"].weight.detach().clone()
        else:
            components[name] = torch.zeros(0, layer.in_features, device=layer.weight.device)
    return components


@torch.no_grad()
def input_covariances(model: nn.Module, names: Sequence[str], batches: list[tuple[Tensor, Tensor]],
                      device: torch.device) -> dict[str, Tensor]:
    """The covariance (float64, d_in x d_in) of each named Linear's input tokens over `batches`."""
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in names}

    def hook_for(name: str):
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            tokens = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            entry = sums[name]
            entry[0] += tokens.shape[0]
            entry[1] = entry[1] + tokens.sum(dim=0)
            entry[2] = entry[2] + tokens.t() @ tokens
        return accumulate

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    try:
        for inputs, _ in batches:
            model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (second - torch.outer(first, first) / count) / max(count - 1, 1)
            for name, (count, first, second) in sums.items()}


class EvaLoRA(LoRA):
    """Our LoRA at EVA's ranks with lora_A = EVA's components and B = 0 (EVA's initialisation);
    modules of rank 0 keep no adapter. One instance per run, holding that run's components."""

    def __init__(self, components: Mapping[str, Tensor]):
        self.components = dict(components)

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        kept = {name: rank for name, rank in ranks.items() if rank > 0}
        if kept:
            layers = add_adapters(model, [f"^{re.escape(name)}$" for name in kept], kept, self.name, seed=seed,
                                  **self.options(stage3))
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.lora_A.copy_(self.components[name][:kept[name]])
        mark_only_adapters_trainable(model)
        train_embedder_and_head(model)


@register_allocation("eva", phase="stage3")
def allocate(setup: AllocationSetup) -> AllocationPlan:
    """EVA's ranks and initialisation, met to our parameter budget (module docstring)."""
    model, shapes, request, stage = setup.model.to(setup.device), setup.shapes, setup.request, setup.stage
    batches = sample_batches(setup.task, stage, setup.seed)
    rank = eva_rank_per_module(shapes, request.budget, stage.eva_rho)
    components = peft_eva_components(model, list(shapes), batches, stage, rank)
    covariances = input_covariances(model, list(shapes), batches, setup.device)
    ratios = {name: explained_variance_ratios(covariances[name], components[name]) if len(components[name]) else []
              for name in shapes}
    ranks = budget_ranks(ratios, shapes, request.budget, rank_caps(shapes, request.r_max))
    eva_ranks = {name: len(components[name]) for name in shapes}
    cost, unit = trainable_params(ranks, shapes), max(shape.d_out + shape.d_in for shape in shapes.values())
    log.info("stage3: eva uses EVA's ranks and its lora_A initialisation (PEFT): EVA at r=%d per module "
             "(rank budget %d) gave ranks %s; met to the budget of %d parameters: ranks %s (%d parameters)",
             rank, rank * len(shapes), list(eva_ranks.values()), request.budget, list(ranks.values()), cost)
    if request.budget - cost >= unit:
        log.warning("stage3: eva's components (rank budget %d, capped at stage2.r_max=%d) cost %d parameters, more "
                    "than one rank-1 component short of the budget %d; raise stage3.eva_rho or stage2.r_max",
                    rank * len(shapes), request.r_max, cost, request.budget)
    return AllocationPlan(ranks, EvaLoRA(components))
