"""Predictor heads h on the body's last-stage NHWC tokens: class logits, a dense output field, or the
pooled features themselves."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.models.embedder import mean_pool
from orca_lora.registry import registrar


def _init_linear(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """PyTorch's Linear default init (kaiming-uniform, a=sqrt(5)), drawn from `generator`."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


class ClassificationHead(nn.Module):
    """Mean-pool the (B, h, w, dim) tokens, then Linear to (B, num_classes) logits."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        _init_linear(self.fc, generator)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(mean_pool(tokens))

    def extra_repr(self) -> str:
        return f"pool=mean, num_classes={self.fc.out_features}"


class DenseHead(nn.Module):
    """Per-token Linear to out_channels * stride^2, pixel shuffle back to the body's input grid.

    (B, h, w, dim) -> (B, out_channels, h * stride, w * stride), then a bilinear resize to
    `out_size` (the target field's resolution) when that differs.
    """

    def __init__(self, dim: int, out_channels: int, stride: int, out_size: tuple[int, int],
                 generator: torch.Generator | None = None):
        super().__init__()
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.fc = nn.Linear(dim, out_channels * stride * stride)
        _init_linear(self.fc, generator)

    def forward(self, tokens: Tensor) -> Tensor:
        field = F.pixel_shuffle(self.fc(tokens).permute(0, 3, 1, 2), self.stride)
        if tuple(field.shape[-2:]) != self.out_size:
            field = F.interpolate(field, size=self.out_size, mode="bilinear", align_corners=False)
        return field

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}, out_size={self.out_size}"


class PooledFeatures(nn.Module):
    """The body's mean-pooled tokens themselves, (B, h, w, dim) -> (B, dim): no parameters, so a task
    regressing the source's own pooled features (planted-shift) is matched by the body alone."""

    def forward(self, tokens: Tensor) -> Tensor:
        return mean_pool(tokens)

    def extra_repr(self) -> str:
        return "pool=mean, parameters=none"


HeadBuilder = Callable[..., nn.Module]
HEADS: dict[str, HeadBuilder] = {}


register_head = registrar(HEADS)


@register_head("classification")
def _classification(dim: int, num_outputs: int, stride: int, output_size: tuple[int, int] | None,
                    generator: torch.Generator | None) -> nn.Module:
    if output_size is not None:
        raise ValueError(f"output_size {output_size} applies to the dense head only; pass None for classification")
    return ClassificationHead(dim, num_outputs, generator=generator)


@register_head("dense")
def _dense(dim: int, num_outputs: int, stride: int, output_size: tuple[int, int] | None,
           generator: torch.Generator | None) -> nn.Module:
    if output_size is None:
        raise ValueError("the dense head needs output_size (H, W) of the target field")
    return DenseHead(dim, num_outputs, stride, output_size, generator=generator)


@register_head("pooled")
def _pooled(dim: int, num_outputs: int, stride: int, output_size: tuple[int, int] | None,
            generator: torch.Generator | None) -> nn.Module:
    if num_outputs != dim or output_size is not None:
        raise ValueError(f"the pooled head outputs the body's {dim} pooled features; got num_outputs {num_outputs} "
                         f"and output_size {output_size}")
    return PooledFeatures()


def build_head(name: str, dim: int, num_outputs: int, stride: int, output_size: tuple[int, int] | None,
               generator: torch.Generator | None = None) -> nn.Module:
    """The registered head `name`: `num_outputs` classes or output channels on `dim`-wide tokens."""
    if name not in HEADS:
        raise KeyError(f"head {name!r} is not one of {sorted(HEADS)}")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    return HEADS[name](dim, num_outputs, stride, output_size, generator)
