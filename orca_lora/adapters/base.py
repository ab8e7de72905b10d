"""What every adapter layer shares (LoRA: Hu et al. 2021; README, "Stage 3: refine"):
a frozen `base_layer`, and an update dW that
merges into it and back.

    h = W0 x + b + dW x,    dW = s B A  (a rank-r product, possibly with a fixed or structured factor)

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


def kaiming_lora_A(base_layer: nn.Linear, rank: int, generator: torch.Generator | None) -> Tensor:
    """A (r x d_in) Kaiming-uniform with a = sqrt(5), as PEFT; drawn on the CPU so the same seed
    gives the same A on every device, then moved to the base weight's device."""
    weight = base_layer.weight
    lora_A = torch.empty(rank, base_layer.in_features, dtype=weight.dtype)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    return lora_A.to(weight.device)


class Adapter(nn.Module):
    """A frozen `base_layer` plus what one stage-3 method trains around it; `method` names the
    method's spec (spec.py), which says how the adapter is saved, merged and analysed."""

    method: str


class AdapterLayer(Adapter, ABC):
    """An adapter around a frozen nn.Linear. Subclasses set `method` and `adapter_parameter_names`
    and define init_adapter (their parameters and options), factors and forward."""

    adapter_parameter_names: tuple[str, ...]  # what training changes: the parameters marked trainable

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        **options: object,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        d_out, d_in = base_layer.weight.shape
        if not 1 <= rank <= min(d_out, d_in):
            raise ValueError(
                f"rank must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] for a Linear of "
                f"shape ({d_out}, {d_in}), got {rank}"
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

    @abstractmethod
    def init_adapter(self, generator: torch.Generator | None) -> None:
        """Create the adapter's parameters (random parts from `generator`); keyword options are the
        method's own (DyLoRA: min_rank, frozen)."""

    @abstractmethod
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) with dW = s B A."""

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

    def merge(self) -> None:
        """W0 <- W0 + dW, so forward is a plain F.linear at the base layer's speed."""
        self._check_merged(False)
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - dW, undoing merge() up to float rounding."""
        self._check_merged(True)
        with torch.no_grad():
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def _check_merged(self, expected: bool) -> None:
        if self.merged != expected:
            state = "not merged; call merge() first" if expected else "already merged; call unmerge() first"
            raise RuntimeError(f"{type(self).__name__} is {state}")

    def extra_repr(self) -> str:
        base = self.base_layer
        return (
            f"in_features={base.in_features}, out_features={base.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:.4g}, use_rslora={self.use_rslora}, "
            f"dropout={self.lora_dropout.p:g}, merged={self.merged}"
        )
