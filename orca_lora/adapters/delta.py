"""Delta-LoRA (Zi et al. 2023, Algorithm 1): LoRA whose frozen W0 also moves by the change of the
LoRA product, and the `delta-lora` method spec.

After optimizer step t (counted from 0) with t > K:

    W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)

written in this package's convention (W0 is d_out x d_in, the product is B A). The rule is attached
to any torch optimizer through its step pre/post hooks, so training loops need no change. The saved
result holds the moved W (`base_layer.weight`), and its weight change is W - W0 + s B A.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from orca_lora.adapters.inject import adapter_modules
from orca_lora.adapters.lora import LoRA, LoRALinear, lora_product
from orca_lora.adapters.spec import WeightChange, register_method
from orca_lora.config import ConfigError, Stage3Config


class DeltaLoRALinear(LoRALinear):
    """LoRA whose frozen W0 is also moved by the Delta-LoRA rule; no adapter dropout.

    Dropout is refused because the rule W += lambda s (B'A' - BA) assumes the adapter path sees the
    same input as W0 (Zi et al. 2023, Algorithm 1).
    """

    method = "delta-lora"

    def init_adapter(self, generator: torch.Generator | None) -> None:
        if self.lora_dropout.p > 0:
            raise ValueError(f"Delta-LoRA layers take no adapter dropout; got dropout={self.lora_dropout.p}, use 0.0")
        super().init_adapter(generator)

    @property
    def saved_tensor_names(self) -> tuple[str, ...]:
        return (*self.adapter_parameter_names, "base_layer.weight")


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

    `modules` are Delta-LoRA layers (add_adapters(..., method="delta-lora")) whose lora_A and lora_B
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
                "(add_adapters(..., method='delta-lora'))"
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


def delta_lora_change(params: Mapping[str, Tensor], frozen_weight: Callable[[], Tensor],
                      stage3: Stage3Config) -> Tensor:
    """W moved by the Delta-LoRA rule, plus s B A, minus the source W0."""
    return params["base_layer.weight"].double() - frozen_weight() + lora_product(params, stage3)


@register_method
class DeltaLoRA(LoRA):
    name, layer = "delta-lora", DeltaLoRALinear
    weight_change = WeightChange(needs=("lora_A", "lora_B", "base_layer.weight"), compute=delta_lora_change)

    def validate(self, stage3: Stage3Config) -> None:
        super().validate(stage3)
        if stage3.dropout > 0:
            raise ConfigError("stage3.dropout: Delta-LoRA uses no adapter dropout; set it to 0")

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module, stage3: Stage3Config) -> DeltaLoRAHandle:
        return attach_delta_lora(optimizer, list(adapter_modules(model).values()), stage3.delta_start_step,
                                 stage3.delta_update_ratio)
