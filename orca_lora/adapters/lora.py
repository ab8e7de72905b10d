"""LoRA layers on a frozen nn.Linear: plain LoRA, Delta-LoRA, DyLoRA and DoRA.

Convention (DESIGN.md 7; Hu et al. 2021, seed 003): the wrapped layer's weight W0 (d_out x d_in)
stays frozen and

    h = W0 x + b + s * B A x,    A (r x d_in) Kaiming-uniform (a = sqrt(5), as PEFT),
                                 B (d_out x r) zeros,  s = alpha / r  (rsLoRA: alpha / sqrt(r)),

with dropout on the adapter path only. Parameter names (`base_layer`, `lora_A`, `lora_B`,
`lora_magnitude_vector`) follow PEFT so state-dict keys map one to one onto PEFT's.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_VARIANTS: dict[str, type["LoRALinear"]] = {}


def register_variant(*names: str) -> Callable[[type["LoRALinear"]], type["LoRALinear"]]:
    """Class decorator registering an adapter layer class under one or more variant names."""

    def decorator(cls: type["LoRALinear"]) -> type["LoRALinear"]:
        for name in names:
            if name in ADAPTER_VARIANTS:
                raise ValueError(f"adapter variant {name!r} is already registered")
            ADAPTER_VARIANTS[name] = cls
        return cls

    return decorator


def get_variant(name: str) -> type["LoRALinear"]:
    """The layer class registered under `name`; KeyError listing the registered names otherwise."""
    if name not in ADAPTER_VARIANTS:
        raise KeyError(f"unknown adapter variant {name!r}; choose one of {sorted(ADAPTER_VARIANTS)}")
    return ADAPTER_VARIANTS[name]


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_param_count(d_out: int, d_in: int, rank: int) -> int:
    """Trainable parameters of one LoRA pair: A (r x d_in) plus B (d_out x r) = r (d_out + d_in)."""
    return rank * (d_out + d_in)


def dora_weight_norm(weight: Tensor, delta_weight: Tensor) -> Tensor:
    """||W0 + dW|| per output feature (row norm, shape (d_out,)); DoRA eq. 5 with PEFT's layout."""
    return torch.linalg.vector_norm(weight + delta_weight, dim=1)


class LoRALinearFunction(torch.autograd.Function):
    """h = x (W0 + s B A)^T + b for a frozen W0 and b, as one autograd node with a hand-written backward.

    Equal to W0 x + b + s B (A x) (Hu et al. 2021). The forward is one full-size GEMM against the
    merged weight W0 + s B A (a rank-r update of a d_out x d_in matrix, cheap next to the n x d_in x
    d_out GEMM) plus the skinny hidden = x A^T that B's gradient needs. With g = dL/dh, the backward is

        g_x = g (W0 + s B A),   g_hidden = g (s B),   g_A = g_hidden^T x,   g_B = s g^T hidden,

    so x's gradient is one GEMM rather than two that autograd then adds. It saves what the autograd
    path saves (x, hidden and the weights) and recomputes the merged weight in backward rather than
    keeping a d_out x d_in copy per layer. Under create_graph the backward rebuilds hidden from x and
    A, so second derivatives are right too. Measured (bench/bench_adapters.py, 1 CPU thread): the
    LoRA training step goes from 0.89 to 0.73 of PEFT's on the tiny Swin and from 0.89 to 0.84 on
    swin_tiny at 224; a two-addmm variant (x W0^T, then += s hidden B^T) and one GEMM of x against
    [W0 + s B A; A] were both slower per layer than this.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("LoRALinearFunction takes a frozen base weight and bias; use the autograd path "
                             "(LoRALinear with base_layer.requires_grad_(True)) to train them")
        x_2d = x.reshape(-1, x.shape[-1])
        merged_weight = torch.addmm(weight, lora_B, lora_A, alpha=scaling)
        out = x_2d @ merged_weight.t() if bias is None else torch.addmm(bias, x_2d, merged_weight.t())
        hidden = x_2d @ lora_A.t() if ctx.needs_input_grad[4] else None
        needs_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(x if needs_x else None, hidden, weight, lora_A, lora_B)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, hidden, weight, lora_A, lora_B = ctx.saved_tensors
        x_2d = None if x is None else x.reshape(-1, x.shape[-1])
        scaling = ctx.scaling
        if torch.is_grad_enabled() and hidden is not None:
            # create_graph: the saved hidden is detached from x and A; rebuild it inside the graph
            hidden = x_2d @ lora_A.t()
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ torch.addmm(weight, lora_B, lora_A, alpha=scaling)).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_A = (grad_2d @ (scaling * lora_B)).t() @ x_2d
        if ctx.needs_input_grad[4]:
            # (hidden^T g)^T: measured ~2x faster than g^T hidden for these skinny shapes (CPU, 1 thread)
            grad_B = (hidden.t() @ grad_2d).t().mul_(scaling)
        return grad_x, None, None, grad_A, grad_B, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
    """h = x W0^T + b + s (x A^T) B^T for a frozen W0 and b: LoRALinearFunction when a gradient is
    wanted, else a single F.linear against W0 + s B A (no hidden is needed then)."""
    if torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling)
    return F.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)


@register_variant("lora", "lora-plus")
class LoRALinear(nn.Module):
    """h = W0 x + b + s B A x around a frozen nn.Linear; LoRA+ only changes the optimizer (optim.py)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
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
        weight = base_layer.weight
        # Initialise on the CPU so the same seed gives the same A on every device.
        lora_A = torch.empty(rank, d_in, dtype=weight.dtype)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_A.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=weight.dtype, device=weight.device))
        self.merged = False
        self.train(base_layer.training)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    @property
    def trainable_param_count(self) -> int:
        return lora_param_count(*self.base_layer.weight.shape, self.rank)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) as used by forward and delta_weight."""
        return self.lora_A, self.lora_B, self.scaling

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

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        lora_A, lora_B, scaling = self.factors()
        if self._fast_path_applies(x, lora_A, lora_B):
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, lora_A, lora_B, scaling)
        x_lora = self.adapter_input(x)
        base = self.base_layer(x)
        hidden = F.linear(x_lora, lora_A)
        # One addmm for "base + s * hidden B^T": measured ~5% faster per training step and ~10% per
        # unmerged forward than a matmul, a scale and an add (bench/bench_adapters.py setting).
        out = torch.addmm(
            base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), lora_B.t(), alpha=scaling
        )
        return out.view(base.shape)

    def _fast_path_applies(self, x: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
        """lora_linear equals forward's autograd path only for a plain, frozen, unhooked nn.Linear, no
        adapter dropout, one dtype throughout and no autocast (whose per-op casts only that path gets)."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not self.dropout_active
            and not any(p.requires_grad for p in base.parameters())
            and x.dtype == base.weight.dtype == lora_A.dtype == lora_B.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

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
        d_out, d_in = self.base_layer.weight.shape
        return (
            f"in_features={d_in}, out_features={d_out}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:.4g}, use_rslora={self.use_rslora}, dropout={self.lora_dropout.p:g}, "
            f"merged={self.merged}"
        )


@register_variant("delta-lora")
class DeltaLoRALinear(LoRALinear):
    """LoRA whose frozen W0 is also moved by the Delta-LoRA rule (delta.py); no adapter dropout.

    Dropout is refused because the rule W += lambda s (B'A' - BA) assumes the adapter path sees the
    same input as W0 (Delta-LoRA, seed 000 Algorithm 1).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if dropout > 0:
            raise ValueError(f"Delta-LoRA layers take no adapter dropout; got dropout={dropout}, use 0.0")
        super().__init__(base_layer, rank, alpha, use_rslora, dropout, generator)


@register_variant("dylora")
class DyLoRALinear(LoRALinear):
    """DyLoRA (seed 000): trains ranks b ~ U{min_rank..rank} at once, h = W0 x + (alpha/b) B[:, :b] A[:b] x.

    `rank` is r_max. Training uses the rank last drawn by sample_rank(); evaluation uses `eval_rank`
    (any b <= r_max). With `frozen`, only component b (row b of A, column b of B) gets gradients.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        min_rank: int = 1,
        frozen: bool = False,
    ) -> None:
        super().__init__(base_layer, rank, alpha, use_rslora, dropout, generator)
        if not 1 <= min_rank <= rank:
            raise ValueError(f"min_rank must be in [1, rank] = [1, {rank}], got {min_rank}")
        self.min_rank, self.frozen = min_rank, frozen
        self._train_rank = self._eval_rank = self._merged_rank = rank

    @property
    def active_rank(self) -> int:
        if self.merged:
            return self._merged_rank
        return self._train_rank if self.training else self._eval_rank

    @property
    def eval_rank(self) -> int:
        return self._eval_rank

    @eval_rank.setter
    def eval_rank(self, value: int) -> None:
        self._check_merged(False)
        if not 1 <= value <= self.rank:
            raise ValueError(f"eval_rank must be in [1, rank] = [1, {self.rank}], got {value}")
        self._eval_rank = int(value)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.active_rank, self.use_rslora)

    def sample_rank(self, generator: torch.Generator) -> int:
        """Draw the training rank b ~ U{min_rank..rank} and use it until the next draw."""
        self._check_merged(False)
        self._train_rank = int(torch.randint(self.min_rank, self.rank + 1, (1,), generator=generator))
        return self._train_rank

    def factors(self) -> tuple[Tensor, Tensor, float]:
        b = self.active_rank
        lora_A, lora_B = self.lora_A[:b], self.lora_B[:, :b]
        if self.frozen and b > 1:
            lora_A = torch.cat([lora_A[: b - 1].detach(), lora_A[b - 1 :]])
            lora_B = torch.cat([lora_B[:, : b - 1].detach(), lora_B[:, b - 1 :]], dim=1)
        return lora_A, lora_B, self.scaling

    def merge(self) -> None:
        rank = self.active_rank
        super().merge()
        self._merged_rank = rank

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_rank={self.min_rank}, active_rank={self.active_rank}, frozen={self.frozen}"


@register_variant("dora")
class DoRALinear(LoRALinear):
    """DoRA (seed 003): h = m / ||W0 + s B A||_row * (W0 + s B A) x + b, m initialised to ||W0||_row.

    The norm is a constant in the gradient (DoRA paper 4.3, as PEFT). With dropout active the input
    of the adapter path differs from W0's, and the output follows PEFT:
    W0 x + b + (m/n - 1) W0 drop(x) + (m/n) s B A drop(x).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base_layer, rank, alpha, use_rslora, dropout, generator)
        with torch.no_grad():
            magnitude = torch.linalg.vector_norm(base_layer.weight, dim=1)
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
