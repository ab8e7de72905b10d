"""`adalora`: AdaLoRA (Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning"), through PEFT's own AdaLoRA layers and rank allocator, in our training loop.

Each adapted Linear carries dW = P diag(E) Q (PEFT: lora_B, lora_E, lora_A) with init_r triplets
(init_r = ceil(stage3.adalora_init_ratio x target_r), the paper's 1.5). After every optimizer step
our loop calls PEFT's `update_and_allocate(step)`: the triplets' smoothed sensitivity |w dL/dw|
(EMAs beta1, beta2) ranks them across modules and the rank budget falls from init_r n to target_r n
(n modules) on a cubic schedule between tinit and total_step - tfinal, masking E of the least
important triplets; from total_step - tfinal on the final rank pattern holds. total_step is stage
3's real number of optimizer steps. The orthogonality penalty

    R = w / N  sum_{P in lora_A, Q in lora_B} ||P P^T - I||_F (A's rows, B's columns),

w = stage3.adalora_orth_reg_weight, N the number of matrices, is added to the loss by hand:
PEFT adds it only inside AdaLoraModel.forward, and only to a transformers output's `.loss`
(PEFT issue #432), a forward our loop does not call.

Budget: PEFT's budget unit is a triplet (rank 1), target_r n of them; ours is parameters
sum_m r_m (d_out + d_in). target_r = round(P / sum_m (d_out + d_in)) makes PEFT's final rank budget
the one a uniform rank of our budget P has (exactly stage3.rank for the uniform budget); the
parameters the final ranks cost follow where AdaLoRA puts them, logged as PEFT counts them (a
triplet also has E's value: r (d_out + d_in + 1)) and in our unit.

For the test split, the best checkpoint is masked to the final rank pattern and each layer becomes a
plain LoRA of its final rank (E and the scale alpha / init_r folded into B; a module of rank 0 keeps
its bare base layer), so the test error, the saved PEFT adapter and `trainable_params` are those of
the final ranks; `trained_params` counts the init_r triplets that trained.

A resumed run restores the triplets and their masks from the checkpoint, but PEFT's allocator
keeps its sensitivity averages in memory only, so they restart from the resumed step.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from torch import Tensor, nn

from orca_lora.adapters.base import lora_scaling
from orca_lora.adapters.inject import replace_modules
from orca_lora.adapters.lora import LoRALinear
from orca_lora.adapters.spec import MethodSpec, train_embedder_and_head
from orca_lora.config import Stage3Config
from orca_lora.finetune.allocations import AllocationPlan, AllocationSetup
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.select import ModuleShape

log = logging.getLogger("orca_lora")
ADAPTER = "default"  # PEFT's adapter name


def orthogonality_penalty(model: nn.Module, adapter: str = ADAPTER) -> Tensor:
    """(1/N) sum ||A A^T - I||_F over lora_A and ||B^T B - I||_F over lora_B, as AdaLoraModel.forward."""
    terms = []
    for name, param in model.named_parameters():
        if name.endswith(f"lora_A.{adapter}"):
            cov = param @ param.T
        elif name.endswith(f"lora_B.{adapter}"):
            cov = param.T @ param
        else:
            continue
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    if not terms:
        raise ValueError("model has no AdaLoRA layers; get_peft_model(model, AdaLoraConfig(...)) first")
    return torch.stack(terms).mean()


def adalora_ranks(shapes: Mapping[str, ModuleShape], budget: int, init_ratio: float) -> tuple[int, int]:
    """(target_r, init_r): target_r = round(P / sum_m (d_out + d_in)) >= 1 (module docstring), init_r =
    ceil(init_ratio target_r), capped at the narrowest module's min(d_out, d_in)."""
    target_r = max(1, round(budget / sum(shape.d_out + shape.d_in for shape in shapes.values())))
    narrowest = min(min(shape.d_out, shape.d_in) for shape in shapes.values())
    init_r = min(math.ceil(init_ratio * target_r), narrowest)
    if init_r <= target_r:
        raise ValueError(f"stage3.adalora_init_ratio: init_r {init_r} must exceed target_r {target_r} for AdaLoRA to "
                         f"prune (the narrowest adapted module allows rank {narrowest}); raise the ratio or lower "
                         "the budget (stage3.rank)")
    return target_r, init_r


def schedule_steps(stage: Stage3Config, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps. tfinal >= 1, so the step total_steps - tfinal, at which PEFT fixes the
    final rank pattern, is one our loop takes."""
    tinit = int(stage.adalora_tinit * total_steps)
    tfinal = max(1, int(stage.adalora_tfinal * total_steps))
    if tinit >= total_steps - tfinal:
        raise ValueError(f"stage3.adalora_tinit: AdaLoRA needs more than tinit + tfinal = {tinit} + {tfinal} training "
                         f"steps and stage 3 takes {total_steps}; raise trainer.max_epochs or lower "
                         "stage3.adalora_tinit / stage3.adalora_tfinal")
    return tinit, tfinal


def kept_pattern(model: nn.Module, adapter: str = ADAPTER) -> dict[str, list[bool]]:
    """PEFT's rank pattern of the model as it is: lora_E's name -> which triplets are unmasked (E != 0)."""
    return {name: (param.detach().view(-1) != 0).tolist() for name, param in model.named_parameters()
            if name.endswith(f"lora_E.{adapter}")}


def as_lora(layer: AdaLoraLayer, stage: Stage3Config, adapter: str = ADAPTER) -> nn.Module:
    """The layer as a plain LoRA of its kept triplets, equal in evaluation: A' = Q[kept],
    B' = P[:, kept] diag(E[kept]) s_ada / s, s_ada = lora_alpha / init_r (PEFT's), s our LoRA scale at
    the kept rank; its bare base layer when no triplet is kept."""
    base = layer.get_base_layer()
    energies = layer.lora_E[adapter].detach().view(-1)
    kept = torch.nonzero(energies).view(-1)
    if kept.numel() == 0:
        return base
    rank = int(kept.numel())
    pruned = LoRALinear(base, rank, stage.alpha, use_rslora=stage.rslora, dropout=stage.dropout)
    ada_scale = layer.scaling[adapter] / (float(layer.ranknum[adapter]) + 1e-5)
    with torch.no_grad():
        pruned.lora_A.copy_(layer.lora_A[adapter][kept])
        scale = ada_scale / lora_scaling(stage.alpha, rank, stage.rslora)
        pruned.lora_B.copy_(layer.lora_B[adapter][:, kept] * energies[kept] * scale)
    return pruned


class AllocationStep:
    """After each optimizer step: PEFT's update_and_allocate(step), the mask updates of AdaLoRA."""

    def __init__(self, model: AdaLoraModel):
        self.model, self.step = model, 0

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        config = self.model.peft_config[ADAPTER]
        if config.rank_pattern is None and self.step > config.total_step - config.tfinal:
            # resumed past the final allocation: the checkpoint's masked E holds the final pattern
            config.rank_pattern = kept_pattern(self.model.model)
        self.model.update_and_allocate(self.step)
        self.step += 1


class AdaLoRA(MethodSpec):
    """PEFT's AdaLoRA layers in our model, its allocator after each step, its penalty in our loss."""

    name = "lora"  # what it tests and saves is a plain LoRA (`finalize`)
    peft_export = mergeable = True

    def __init__(self, config: AdaLoraConfig, shapes: Mapping[str, ModuleShape], stage: Stage3Config):
        self.config, self.shapes, self.stage = config, dict(shapes), stage
        self.peft_model: AdaLoraModel | None = None

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # PEFT draws P and Q from torch's global generator
            self.peft_model = get_peft_model(model, self.config).base_model
        train_embedder_and_head(model)  # PEFT froze all but its adapters

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module, stage3: Stage3Config) -> AllocationStep:
        hook = AllocationStep(self.peft_model)
        optimizer.register_step_post_hook(hook)
        return hook

    def penalty(self, model: nn.Module) -> Tensor:
        return self.config.orth_reg_weight * orthogonality_penalty(model)

    def finalize(self, model: nn.Module) -> None:
        config = self.peft_model.peft_config[ADAPTER]
        pattern = config.rank_pattern or kept_pattern(model)
        self.peft_model.rankallocator.mask_using_rank_pattern(model, pattern)
        layers = {name: module for name, module in model.named_modules() if isinstance(module, AdaLoraLayer)}
        replace_modules(model, {name: as_lora(layer, self.stage) for name, layer in layers.items()})
        ranks = {name: sum(pattern[f"{name}.lora_E.{ADAPTER}"]) for name in layers}
        ours = sum(rank * (self.shapes[name].d_out + self.shapes[name].d_in) for name, rank in ranks.items())
        log.info("stage3: adalora's final ranks %s: %d triplets (PEFT's budget target_r x n = %d), %d parameters as "
                 "PEFT counts them (r (d_out + d_in + 1)), %d in our unit r (d_out + d_in)", list(ranks.values()),
                 sum(ranks.values()), config.target_r * len(layers), ours + sum(ranks.values()), ours)


@register_allocation("adalora", phase="stage3")
def allocate(setup: AllocationSetup) -> AllocationPlan:
    """PEFT's AdaLoRA at init_r, pruned to target_r while stage 3 trains (module docstring)."""
    stage, shapes = setup.stage, setup.shapes
    target_r, init_r = adalora_ranks(shapes, setup.request.budget, stage.adalora_init_ratio)
    tinit, tfinal = schedule_steps(stage, setup.total_steps)
    config = AdaLoraConfig(
        target_modules=list(shapes), init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
        deltaT=stage.adalora_delta_t, beta1=stage.adalora_beta1, beta2=stage.adalora_beta2,
        orth_reg_weight=stage.adalora_orth_reg_weight, total_step=setup.total_steps, lora_alpha=stage.alpha,
        lora_dropout=stage.dropout)
    log.info("stage3: adalora (PEFT) trains init_r=%d triplets per module, pruned to target_r=%d (budget %d "
             "parameters) over %d steps (tinit %d, tfinal %d)", init_r, target_r, setup.request.budget,
             setup.total_steps, tinit, tfinal)
    return AllocationPlan(dict.fromkeys(shapes, init_r), AdaLoRA(config, shapes, stage))
