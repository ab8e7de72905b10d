"""What every adapter layer shares (LoRA: Hu et al. 2021; README, "Stage 3: refine"):
a frozen `base_layer`, and an update dW that
merges into it and back.

    h = W0 x + b + dW x,    dW = s B A  (a rank-r product, possibly with a fixed or structured factor)

W0 is the (d_out x d_in) matrix the base layer applies: an nn.Linear's weight, or a patchify Conv2d's
(kernel = stride) weight acting on each flattened patch, d_in = in_channels * kh * kw (conv_lora.py).

`AdapterLayer` holds the settings of the LoRA family (rank, alpha, rsLoRA, dropout on the adapter
path only) and merging; each method's module defines the parameters (`init_adapter`), the factors
and the forward. Parameter names follow PEFT (`base_layer`, `lora_dropout`, `lora_A`, `lora_B`) so
state-dict keys map one to one onto PEFT's.
"""

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def weight_matrix_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the matrix W0 a base layer applies: (out_features, in_features) for a Linear (or
    NF4Linear), (out_channels, in_channels * kh * kw) for a patchify Conv2d acting on flattened patches."""
    if isinstance(base_layer, nn.Conv2d):
        kernel_h, kernel_w = base_layer.kernel_size
        return base_layer.out_channels, base_layer.in_channels * kernel_h * kernel_w
    return base_layer.out_features, base_layer.in_features


def describe_matrix(base_layer: nn.Module) -> str:
    """'Linear of shape (d_out, d_in)', or 'Conv2d of patch-matrix shape (d_out, d_in)', for error messages."""
    kind = "Conv2d of patch-matrix" if isinstance(base_layer, nn.Conv2d) else "Linear of"
    return f"{kind} shape {weight_matrix_shape(base_layer)}"


def kaiming_lora_A(base_layer: nn.Linear | nn.Conv2d, rank: int, generator: torch.Generator | None) -> Tensor:
    """A Kaiming-uniform with a = sqrt(5), as PEFT: (r x d_in) for a Linear, (r, in_channels, kh, kw) for
    a Conv2d (the same draws, fan_in = d_in). Drawn on the CPU so the same seed gives the same A on
    every device, then moved to the base weight's device."""
    weight = base_layer.weight
    lora_A = torch.empty(rank, *weight.shape[1:], dtype=weight.dtype)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    return lora_A.to(weight.device)


class Adapter(nn.Module):
    """A frozen `base_layer` plus what one stage-3 method trains around it; `method` names the
    method's spec (spec.py), which says how the adapter is saved, merged and analysed."""

    method: str


class AdapterLayer(Adapter, ABC):
    """An adapter around a frozen nn.Linear (or, where a subclass overrides check_base_layer, a patchify
    Conv2d). Subclasses set `method` and `adapter_parameter_names` and define init_adapter (their
    parameters and options), factors (as d_out x d_in matrices) and forward."""

    adapter_parameter_names: tuple[str, ...]  # what training changes: the parameters marked trainable

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        **options: object,
    ) -> None:
        super().__init__()
        self.check_base_layer(base_layer)
        d_out, d_in = weight_matrix_shape(base_layer)
        if not 1 <= rank <= min(d_out, d_in):
            raise ValueError(
                f"rank must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] for a "
                f"{describe_matrix(base_layer)}, got {rank}"
            )
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.init_adapter(generator, **options)
        self.train(base_layer.training)

    @classmethod
    def check_base_layer(cls, base_layer: nn.Module) -> None:
        """Raise ValueError unless the layer can wrap `base_layer`: an nn.Linear here."""
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")

    @abstractmethod
    def init_adapter(self, generator: torch.Generator | None) -> None:
        """Create the adapter's parameters (random parts from `generator`); keyword options are the
        method's own (DyLoRA: min_rank, frozen)."""

    @abstractmethod
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) with dW = s B A; A (r x d_in) and B (d_out x r) as matrices."""

    @property
    def saved_tensor_names(self) -> tuple[str, ...]:
        """State-dict names (relative to the layer) that a checkpoint of the trained layer holds."""
        return self.adapter_parameter_names

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def delta_weight(self) -> Tensor:
        """dW = s * B @ A, shape (d_out, d_in)."""
        lora_A, lora_B, scaling = self.factors()
        return scaling * (lora_B @ lora_A)

    @property
    def dropout_active(self) -> bool:
        return self.training and self.lora_dropout.p > 0

    def adapter_input(self, x: Tensor) -> Tensor:
        """x as the adapter path sees it: dropped out while training, when dropout is set."""
        return self.lora_dropout(x) if self.dropout_active else x

    def _weight_delta(self) -> Tensor:
        """dW in the base weight's shape and dtype (a Conv2d's (d_out, in_channels, kh, kw))."""
        weight = self.base_layer.weight
        return self.delta_weight().reshape(weight.shape).to(weight.dtype)

    def merge(self) -> None:
        """W0 <- W0 + dW, so forward is the plain base layer at its own speed."""
        self._check_merged(False)
        with torch.no_grad():
            self.base_layer.weight += self._weight_delta()
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - dW, undoing merge() up to float rounding."""
        self._check_merged(True)
        with torch.no_grad():
            self.base_layer.weight -= self._weight_delta()
        self.merged = False

    def _check_merged(self, expected: bool) -> None:
        if self.merged != expected:
            state = "not merged; call merge() first" if expected else "already merged; call unmerge() first"
            raise RuntimeError(f"{type(self).__name__} is {state}")

    def extra_repr(self) -> str:
        d_out, d_in = weight_matrix_shape(self.base_layer)
        return (
            f"in_features={d_in}, out_features={d_out}, rank={self.rank}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:.4g}, use_rslora={self.use_rslora}, "
            f"dropout={self.lora_dropout.p:g}, merged={self.merged}"
        )
