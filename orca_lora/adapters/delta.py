"""Delta-LoRA (seed 000, Algorithm 1): move the frozen W0 by the change of the LoRA product.

After optimizer step t (counted from 0) with t > K:

    W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)

written in this package's convention (W0 is d_out x d_in, the product is B A). The rule is attached
to any torch optimizer through its step pre/post hooks, so training loops need no change.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from orca_lora.adapters.lora import DeltaLoRALinear


def delta_lora_update(
    weight: Tensor,
    old_A: Tensor,
    old_B: Tensor,
    new_A: Tensor,
    new_B: Tensor,
    scaling: float,
    update_ratio: float,
) -> Tensor:
    """W + lambda * s * (B' A' - B A) (Delta-LoRA, Algorithm 1); returns a new tensor."""
    return weight + update_ratio * scaling * (new_B @ new_A - old_B @ old_A)


@dataclass
class DeltaLoRAHandle:
    """Live Delta-LoRA hooks on one optimizer; `step` counts the optimizer steps seen so far."""

    modules: list[DeltaLoRALinear]
    start_step: int
    update_ratio: float
    step: int = 0
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _snapshots: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        """Whether the current step moves W (Algorithm 1: t > K)."""
        return self.step > self.start_step

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _before_step(self, *_: object) -> None:
        if self.active:
            self._snapshots = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in self.modules]

    @torch.no_grad()
    def _after_step(self, *_: object) -> None:
        for module, (old_A, old_B) in zip(self.modules, self._snapshots):
            weight = module.base_layer.weight
            weight.copy_(
                delta_lora_update(weight, old_A, old_B, module.lora_A, module.lora_B, module.scaling, self.update_ratio)
            )
        self._snapshots = []
        self.step += 1


def attach_delta_lora(
    optimizer: torch.optim.Optimizer,
    modules: Mapping[str, DeltaLoRALinear] | Iterable[DeltaLoRALinear],
    start_step: int,
    update_ratio: float,
) -> DeltaLoRAHandle:
    """Apply the Delta-LoRA rule after every `optimizer.step()`; `.remove()` on the result detaches it.

    `modules` are Delta-LoRA layers (add_adapters(..., variant="delta-lora")) whose lora_A and lora_B
    the optimizer updates; `start_step` is K and `update_ratio` is lambda in Algorithm 1.
    """
    named = dict(modules) if isinstance(modules, Mapping) else dict(enumerate(modules))
    if not named:
        raise ValueError("modules is empty; pass the Delta-LoRA layers, e.g. adapter_modules(model)")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if update_ratio <= 0:
        raise ValueError(f"update_ratio must be > 0, got {update_ratio}")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, module in named.items():
        if not isinstance(module, DeltaLoRALinear):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}; Delta-LoRA needs DeltaLoRALinear layers "
                "(add_adapters(..., variant='delta-lora'))"
            )
        if module.lora_dropout.p > 0:
            raise ValueError(f"module {name!r} has adapter dropout {module.lora_dropout.p}; Delta-LoRA needs 0")
        if id(module.lora_A) not in optimized or id(module.lora_B) not in optimized:
            raise ValueError(f"the optimizer does not update lora_A and lora_B of module {name!r}")
    handle = DeltaLoRAHandle(list(named.values()), start_step, update_ratio)
    handle._hooks = [
        optimizer.register_step_pre_hook(handle._before_step),
        optimizer.register_step_post_hook(handle._after_step),
    ]
    return handle
