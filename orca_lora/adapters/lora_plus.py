"""LoRA+ (Hayou et al. 2024): plain LoRA layers whose B learns `stage3.loraplus_ratio` times faster
than A, A <- A - eta G_A, B <- B - lambda eta G_B with lambda >> 1; the `lora-plus` method spec.

Only the optimizer differs from LoRA, so the layer, the PEFT export and the weight change are LoRA's.
"""

from torch import nn

from orca_lora.adapters.lora import LoRA
from orca_lora.adapters.optim import adapter_param_groups
from orca_lora.adapters.spec import register_method
from orca_lora.config import Stage3Config


@register_method
class LoRAPlus(LoRA):
    name = "lora-plus"

    def param_groups(self, module: nn.Module, stage3: Stage3Config) -> list[dict]:
        return adapter_param_groups(module, stage3.lr, stage3.weight_decay, loraplus_ratio=stage3.loraplus_ratio)
