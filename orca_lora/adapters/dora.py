"""DoRA (Liu et al. 2024): LoRA split into a magnitude and a direction, and the `dora` method spec.

    h = m / ||W0 + s B A||_row * (W0 + s B A) x + b,    m initialised to ||W0||_row,

the norm a constant in the gradient (the paper's section 4.3, as PEFT). Saved in PEFT's layout
with `use_dora`; its weight change is m / ||W0 + s B A||_row * (W0 + s B A) - W0.
"""

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.lora import LoRA, LoRALinear, lora_product
from orca_lora.adapters.spec import WeightChange, register_method
from orca_lora.config import Stage3Config


def dora_weight_norm(weight: Tensor, delta_weight: Tensor) -> Tensor:
    """||W0 + dW|| per output feature (row norm, shape (d_out,)); DoRA eq. 5 with PEFT's layout."""
    return torch.linalg.vector_norm(weight + delta_weight, dim=1)


class DoRALinear(LoRALinear):
    """DoRA around a frozen nn.Linear. With dropout active the input of the adapter path differs
    from W0's, and the output follows PEFT: W0 x + b + (m/n - 1) W0 drop(x) + (m/n) s B A drop(x).
    """

    method = "dora"
    adapter_parameter_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def init_adapter(self, generator: torch.Generator | None) -> None:
        super().init_adapter(generator)
        with torch.no_grad():
            magnitude = torch.linalg.vector_norm(self.base_layer.weight, dim=1)
        self.lora_magnitude_vector = nn.Parameter(magnitude)
        self._merged_norm: Tensor | None = None

    @property
    def trainable_param_count(self) -> int:
        return super().trainable_param_count + self.base_layer.out_features

    def weight_norm(self) -> Tensor:
        """||W0 + s B A||_row, detached."""
        with torch.no_grad():
            return dora_weight_norm(self.base_layer.weight, self.delta_weight())

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        lora_A, lora_B, scaling = self.factors()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        magnitude_scale = self.lora_magnitude_vector / self.weight_norm()
        if self.dropout_active:
            x_lora = self.lora_dropout(x)
            lora = F.linear(F.linear(x_lora, lora_A), lora_B) * scaling
            return self.base_layer(x) + (magnitude_scale - 1) * F.linear(x_lora, weight) + magnitude_scale * lora
        lora = F.linear(F.linear(x, lora_A), lora_B) * scaling
        out = magnitude_scale * (F.linear(x, weight) + lora)
        return out if bias is None else out + bias

    def merge(self) -> None:
        """W0 <- m / ||W0 + dW||_row * (W0 + dW); the norm is kept so unmerge() can invert it."""
        self._check_merged(False)
        norm = self.weight_norm()
        with torch.no_grad():
            factor = (self.lora_magnitude_vector / norm).unsqueeze(1)
            weight = self.base_layer.weight
            weight.copy_(factor * (weight + self.delta_weight()))
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        self._check_merged(True)
        with torch.no_grad():
            factor = (self.lora_magnitude_vector / self._merged_norm).unsqueeze(1)
            weight = self.base_layer.weight
            weight.copy_(weight / factor - self.delta_weight())
        self._merged_norm = None
        self.merged = False


def dora_change(params: Mapping[str, Tensor], frozen_weight: Callable[[], Tensor], stage3: Stage3Config) -> Tensor:
    """m / ||W0 + s B A||_row * (W0 + s B A) - W0."""
    weight, product = frozen_weight(), lora_product(params, stage3)
    scale = params["lora_magnitude_vector"].double() / dora_weight_norm(weight, product)
    return scale.unsqueeze(1) * (weight + product) - weight


@register_method
class DoRA(LoRA):
    name, layer = "dora", DoRALinear
    weight_change = WeightChange(needs=("lora_A", "lora_B", "lora_magnitude_vector"), compute=dora_change)
