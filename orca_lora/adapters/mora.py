"""MoRA (Jiang et al. 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning"), and the
`mora` method spec: one trainable square matrix M between parameter-free compress and decompress
operators,

    h = W0 x + b + f_decomp(M f_comp(x)),    M (r_hat x r_hat) zeros,   r_hat = floor(sqrt(r (d_in + d_out))),

so M holds at most LoRA's r (d_in + d_out) parameters while dW = f_decomp M f_comp can reach rank r_hat.
The operators are the paper's row-and-column sharing (Sec. 3), as `mora_type=1` of the official code
(github.com/kongds/MoRA, peft-mora/src/peft/tuners/lora/layer.py, `_apply_mora`):

    f_comp(x)[c]   = sum of x'[p] over p = c (mod r_hat),  x' = x extended cyclically to a multiple of r_hat
    f_decomp(h)[i] = h[i mod r_hat]

so dW[i, j] = sum of M[i mod r_hat, p mod r_hat] over the padded positions p that read x_j (p mod d_in = j).
The official code pads cyclically (x' = [x, x[:pad]]) so every group sums the same number of inputs.
MoRA has no scale (the official code sets scaling 1), so `alpha` does not enter and rsLoRA is refused.
It merges into W0 like LoRA, has no PEFT layout (stage 3 keeps M in trainable.safetensors) and no
weight-change rule for `analyze`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer
from orca_lora.adapters.inject import LinearAdapterMethod
from orca_lora.adapters.spec import register_method
from orca_lora.config import ConfigError, Stage3Config


def mora_rank(rank: int, d_in: int, d_out: int) -> int:
    """r_hat = floor(sqrt(r (d_in + d_out))), so that r_hat^2 <= LoRA's r (d_in + d_out) (MoRA, Sec. 3)."""
    if rank < 1 or d_in < 1 or d_out < 1:
        raise ValueError(f"rank, d_in and d_out must be >= 1, got rank={rank}, d_in={d_in}, d_out={d_out}")
    return math.isqrt(rank * (d_in + d_out))


def cyclic_extend(x: Tensor, size: int) -> Tensor:
    """The last axis repeated cyclically and cut to `size` entries: out[..., p] = x[..., p mod d]."""
    repeats = -(-size // x.shape[-1])
    return x.repeat(*([1] * (x.dim() - 1)), repeats)[..., :size]


def mora_compress(x: Tensor, r_hat: int) -> Tensor:
    """f_comp, (..., d_in) -> (..., r_hat): x extended cyclically to ceil(d_in / r_hat) r_hat entries,
    then the entries with the same index mod r_hat summed."""
    groups = -(-x.shape[-1] // r_hat)
    return cyclic_extend(x, groups * r_hat).unflatten(-1, (groups, r_hat)).sum(-2)


def mora_decompress(h: Tensor, d_out: int) -> Tensor:
    """f_decomp, (..., r_hat) -> (..., d_out): out[..., i] = h[..., i mod r_hat]."""
    return cyclic_extend(h, d_out)


class MoRALinear(AdapterLayer):
    """h = W0 x + b + f_decomp(M f_comp(x)) around a frozen nn.Linear; `rank` is LoRA's nominal r."""

    method = "mora"
    adapter_parameter_names = ("mora_M",)

    def init_adapter(self, generator: torch.Generator | None) -> None:
        if self.use_rslora:
            raise ValueError("MoRA has no LoRA scale for rsLoRA to change; use use_rslora=False")
        weight = self.base_layer.weight
        self.r_hat = mora_rank(self.rank, self.base_layer.in_features, self.base_layer.out_features)
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, dtype=weight.dtype, device=weight.device))

    @property
    def scaling(self) -> float:
        return 1.0

    @property
    def trainable_param_count(self) -> int:
        return self.r_hat**2

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(M C, T, 1), the equivalent rank-r_hat LoRA (dW = T M C), with C (r_hat x d_in) and T
        (d_out x r_hat) the compress and decompress operators applied to identity matrices."""
        weight = self.mora_M
        eye_in = torch.eye(self.base_layer.in_features, dtype=weight.dtype, device=weight.device)
        eye_hat = torch.eye(self.r_hat, dtype=weight.dtype, device=weight.device)
        compress = mora_compress(eye_in, self.r_hat).t()
        decompress = mora_decompress(eye_hat, self.base_layer.out_features).t()
        return self.mora_M @ compress, decompress, self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        x_lora = self.adapter_input(x)
        hidden = F.linear(mora_compress(x_lora, self.r_hat), self.mora_M)
        return self.base_layer(x) + mora_decompress(hidden, self.base_layer.out_features)

    def extra_repr(self) -> str:
        d_out, d_in = self.base_layer.weight.shape
        return (
            f"in_features={d_in}, out_features={d_out}, rank={self.rank}, r_hat={self.r_hat}, "
            f"dropout={self.lora_dropout.p:g}, merged={self.merged}"
        )


@register_method
class MoRA(LinearAdapterMethod):
    name, layer = "mora", MoRALinear
    mergeable = True

    def validate(self, stage3: Stage3Config) -> None:
        super().validate(stage3)
        if stage3.rslora:
            raise ConfigError("stage3.rslora: MoRA has no LoRA scale for rsLoRA to change; set it to false")
