"""LoRA (Hu et al. 2021) on a patch-embedding conv: a Conv2d with kernel = stride and no padding is a
linear map of non-overlapping patch vectors, so LoRA applies to it as to a Linear (README, "Known-answer
controls": the exact control adapts only the embedding projection).

PEFT's layout for convolutions (`peft/tuners/lora/layer.py`, `_ConvNd`): lora_A is a conv with the base's
kernel and stride to r channels, lora_B a 1 x 1 conv back to the output channels, so

    h = conv(x; W0, b) + s conv_1x1(conv(x; A); B) = conv(x; W0 + s B A, b),

with A (r, c, p, p) and B (d, r, 1, 1) kept in exactly those shapes (PEFT's `lora_A.weight` and
`lora_B.weight`). On patch vectors flattened in (channel, row, column) order the update is the matrix
dW = s B_(d x r) A_(r x c p p), of rank <= r <= min(d, c p p). A is Kaiming-uniform (a = sqrt(5), fan-in
c p p, as PEFT), B zeros, s = alpha / r (rsLoRA: alpha / sqrt(r)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer


def is_patch_projection(module: nn.Module) -> bool:
    """A Conv2d that maps each non-overlapping patch on its own: kernel = stride, no padding or dilation,
    one group (what a ViT or Swin patch embedding is)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == module.stride
            and tuple(module.padding) == (0, 0) and tuple(module.dilation) == (1, 1) and module.groups == 1)


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the weight as a matrix: a Linear's, or a patch projection's on patch vectors."""
    weight = module.weight
    return int(weight.shape[0]), int(weight[0].numel())


class LoRAConv2d(AdapterLayer):
    """h = conv(x; W0 + s B A, b) around a frozen patch-embedding conv, in PEFT's Conv2d LoRA layout."""

    method = "lora"
    adapter_parameter_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d, rank: int, alpha: float = 16.0, use_rslora: bool = False,
                 dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        # AdapterLayer.__init__ takes an nn.Linear; these are its settings and checks for a patch conv
        if not is_patch_projection(base_layer):
            raise ValueError(f"base_layer must be a patch-embedding Conv2d (kernel = stride, no padding or "
                             f"dilation, one group), got {base_layer}")
        d_out, d_in = matrix_shape(base_layer)
        if not 1 <= rank <= min(d_out, d_in):
            raise ValueError(f"rank must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] for a patch conv "
                             f"acting as a ({d_out}, {d_in}) matrix, got {rank}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        nn.Module.__init__(self)
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.init_adapter(generator)
        self.train(base_layer.training)

    def init_adapter(self, generator: torch.Generator | None) -> None:
        weight = self.base_layer.weight
        d_out, d_in = matrix_shape(self.base_layer)
        lora_A = torch.empty(self.rank, d_in, dtype=weight.dtype)  # drawn on the CPU, as kaiming_lora_A
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_A.view(self.rank, *weight.shape[1:]).to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.rank, 1, 1, dtype=weight.dtype, device=weight.device))

    @property
    def in_channels(self) -> int:
        """The wrapped conv's, which callers of the conv it replaced read (the embedder checks its input)."""
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    @property
    def trainable_param_count(self) -> int:
        d_out, d_in = matrix_shape(self.base_layer)
        return self.rank * (d_out + d_in)

    @property
    def peft_rank(self) -> int:
        return self.rank

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) as matrices on patch vectors: A (r, c p p), B (d, r)."""
        return self.lora_A.flatten(1), self.lora_B.flatten(1), self.scaling

    def delta_weight(self) -> Tensor:
        """dW = s B A in the conv weight's shape (d, c, p, p)."""
        return super().delta_weight().view_as(self.base_layer.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        hidden = F.conv2d(self.adapter_input(x), self.lora_A, stride=self.base_layer.stride)
        return self.base_layer(x) + self.scaling * F.conv2d(hidden, self.lora_B)

    def extra_repr(self) -> str:
        base = self.base_layer
        return (f"in_channels={base.in_channels}, out_channels={base.out_channels}, kernel_size={base.kernel_size}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, use_rslora={self.use_rslora}, "
                f"dropout={self.lora_dropout.p:g}, merged={self.merged}")
