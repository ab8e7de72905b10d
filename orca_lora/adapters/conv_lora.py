"""LoRA (Hu et al. 2021) on a frozen patchify nn.Conv2d, such as the target embedder's `embedder.proj`.

A patchify conv (kernel_size == stride, no padding, dilation 1, groups 1) applies one matrix W0
(d_out x d_in, d_out = out_channels, d_in = in_channels * kh * kw) to each flattened, non-overlapping
patch p, so LoRA adapts it exactly as a Linear:

    h(p) = W0 p + b + s B A p,    A (r x d_in) Kaiming-uniform (a = sqrt(5)), B (d_out x r) zeros,
                                  s = alpha / r  (rsLoRA: alpha / sqrt(r)).

Parameters follow PEFT's conv LoRA layout (peft.tuners.lora.layer.Conv2d): `lora_A` is the weight of a
Conv2d(in_channels, r, kernel, stride), shape (r, in_channels, kh, kw), and `lora_B` of a 1x1
Conv2d(r, out_channels), shape (out_channels, r, 1, 1), so state-dict keys and shapes equal PEFT's
and `A.flatten(1)`, `B.flatten(1)` are the matrices above (flattened like F.unfold's patch vectors).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer, kaiming_lora_A, weight_matrix_shape

PATCHIFY = "kernel_size == stride, no padding, dilation 1, groups 1"


def patchify_conv_problems(conv: nn.Conv2d) -> list[str]:
    """The settings that keep `conv` from being a patchify conv (PATCHIFY); empty when it is one."""
    problems = []
    if conv.stride != conv.kernel_size:
        problems.append(f"stride={conv.stride} != kernel_size={conv.kernel_size}")
    if conv.padding not in ((0, 0), "valid"):
        problems.append(f"padding={conv.padding}")
    if conv.dilation != (1, 1):
        problems.append(f"dilation={conv.dilation}")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    return problems


def is_patchify_conv(module: nn.Module) -> bool:
    """Whether `module` is an nn.Conv2d that LoRAPatchConv2d can wrap."""
    return isinstance(module, nn.Conv2d) and not patchify_conv_problems(module)


class LoRAPatchConv2d(AdapterLayer):
    """h = conv(x; W0) + s * conv_1x1(conv(dropout(x); A, stride = kernel); B) around a frozen patchify Conv2d,
    i.e. W0 p + b + s B A p on every patch p (PEFT's conv LoRA forward, lora_B(lora_A(dropout(x))) * s)."""

    method = "lora"
    adapter_parameter_names = ("lora_A", "lora_B")

    @classmethod
    def check_base_layer(cls, base_layer: nn.Module) -> None:
        """Raise ValueError unless `base_layer` is a patchify nn.Conv2d, naming the settings that differ."""
        if not isinstance(base_layer, nn.Conv2d):
            raise ValueError(f"base_layer must be an nn.Conv2d, got {type(base_layer).__name__}")
        problems = patchify_conv_problems(base_layer)
        if problems:
            raise ValueError(f"{cls.__name__} needs a patchify Conv2d ({PATCHIFY}); this one has "
                             f"{', '.join(problems)}")

    def init_adapter(self, generator: torch.Generator | None) -> None:
        weight = self.base_layer.weight
        self.lora_A = nn.Parameter(kaiming_lora_A(self.base_layer, self.rank, generator))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], self.rank, 1, 1, dtype=weight.dtype,
                                               device=weight.device))

    @property
    def trainable_param_count(self) -> int:
        """r (d_out + d_in), as a LoRA pair on the (d_out x d_in) patch matrix."""
        d_out, d_in = weight_matrix_shape(self.base_layer)
        return self.rank * (d_out + d_in)

    @property
    def peft_rank(self) -> int:
        """The rank of the plain LoRA that PEFT's files hold for this layer."""
        return self.rank

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) with A = lora_A.flatten(1) (r x d_in) and B = lora_B.flatten(1) (d_out x r)."""
        return self.lora_A.flatten(1), self.lora_B.flatten(1), self.scaling

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer(x)
        if self.merged:
            return base
        hidden = F.conv2d(self.adapter_input(x), self.lora_A, stride=self.base_layer.stride)
        return torch.add(base, F.conv2d(hidden, self.lora_B), alpha=self.scaling)

    def extra_repr(self) -> str:
        base = self.base_layer
        return (f"in_channels={base.in_channels}, out_channels={base.out_channels}, "
                f"kernel_size={base.kernel_size}, {super().extra_repr()}")
