"""LoRA (Hu et al. 2021) on a frozen nn.Linear, and the `lora` method spec (which also puts
LoRAPatchConv2d, conv_lora.py, on a targeted patchify Conv2d).

Convention (LoRA: Hu et al. 2021;
README, "Stage 3: refine"): the wrapped layer's weight W0 (d_out x d_in) stays frozen and

    h = W0 x + b + s * B A x,    A (r x d_in) Kaiming-uniform (a = sqrt(5), as PEFT),
                                 B (d_out x r) zeros,  s = alpha / r  (rsLoRA: alpha / sqrt(r)),

with dropout on the adapter path only. The weight change `analyze` reads is s B A itself.
"""

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer, kaiming_lora_A, lora_scaling
from orca_lora.adapters.conv_lora import LoRAPatchConv2d
from orca_lora.adapters.inject import LinearAdapterMethod
from orca_lora.adapters.spec import WeightChange, register_method
from orca_lora.config import Stage3Config


def lora_param_count(d_out: int, d_in: int, rank: int) -> int:
    """Trainable parameters of one LoRA pair: A (r x d_in) plus B (d_out x r) = r (d_out + d_in)."""
    return rank * (d_out + d_in)


class LoRALinearFunction(torch.autograd.Function):
    """h = x (W0 + s B A)^T + b for a frozen W0 and b, as one autograd node with a hand-written backward.

    Equal to W0 x + b + s B (A x) (Hu et al. 2021). The forward is one full-size GEMM against the
    merged weight W0 + s B A (a rank-r update of a d_out x d_in matrix, cheap next to the n x d_in x
    d_out GEMM) plus the skinny hidden = x A^T that B's gradient needs. With g = dL/dh, the backward is

        g_x = g (W0 + s B A),   g_hidden = g (s B),   g_A = g_hidden^T x,   g_B = s g^T hidden,

    so x's gradient is one GEMM rather than two that autograd then adds. It saves what the autograd
    path saves (x, hidden and the weights) and recomputes the merged weight in backward rather than
    keeping a d_out x d_in copy per layer. Under create_graph the backward rebuilds hidden from x and
    A, so second derivatives are right too. Why: it makes the LoRA training step faster than autograd's
    three GEMMs (bench/bench_adapters.py, whose results are in bench/results).
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
            # (hidden^T g)^T: faster than g^T hidden for these skinny shapes (bench/bench_adapters.py)
            grad_B = (hidden.t() @ grad_2d).t().mul_(scaling)
        return grad_x, None, None, grad_A, grad_B, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
    """h = x W0^T + b + s (x A^T) B^T for a frozen W0 and b: LoRALinearFunction when a gradient is
    wanted, else a single F.linear against W0 + s B A (no hidden is needed then)."""
    if torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling)
    return F.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)


class LoRALinear(AdapterLayer):
    """h = W0 x + b + s B A x around a frozen nn.Linear."""

    method = "lora"
    adapter_parameter_names = ("lora_A", "lora_B")

    def init_adapter(self, generator: torch.Generator | None) -> None:
        weight = self.base_layer.weight
        self.lora_A = nn.Parameter(kaiming_lora_A(self.base_layer, self.rank, generator))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], self.rank, dtype=weight.dtype, device=weight.device))

    @property
    def trainable_param_count(self) -> int:
        return lora_param_count(self.base_layer.out_features, self.base_layer.in_features, self.rank)

    @property
    def peft_rank(self) -> int:
        """The rank of the plain LoRA that PEFT's files hold for this layer."""
        return self.rank

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) as used by forward and delta_weight."""
        return self.lora_A, self.lora_B, self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        lora_A, lora_B, scaling = self.factors()
        if self._fast_path_applies(x, lora_A, lora_B):
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, lora_A, lora_B, scaling)
        x_lora = self.adapter_input(x)
        base = self.base_layer(x)
        hidden = F.linear(x_lora, lora_A)
        # One addmm for "base + s * hidden B^T": faster per training step and per unmerged forward
        # than a matmul, a scale and an add (bench/bench_adapters.py).
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


def lora_product(params: Mapping[str, Tensor], stage3: Stage3Config) -> Tensor:
    """s B A in float64 from saved `lora_A` and `lora_B` (a conv LoRA's flattened to matrices, so s B A
    is its d_out x d_in patch matrix), s from stage3's alpha and rsLoRA flag."""
    lora_A, lora_B = params["lora_A"].double().flatten(1), params["lora_B"].double().flatten(1)
    return lora_scaling(stage3.alpha, lora_A.shape[0], stage3.rslora) * (lora_B @ lora_A)


def lora_change(params: Mapping[str, Tensor], frozen_weight: Callable[[], Tensor], stage3: Stage3Config) -> Tensor:
    """s B A, with s = alpha / r (alpha / sqrt(r) with rsLoRA); W0 is not needed."""
    return lora_product(params, stage3)


LORA_CHANGE = WeightChange(needs=("lora_A", "lora_B"), compute=lora_change)


@register_method
class LoRA(LinearAdapterMethod):
    name, layer = "lora", LoRALinear
    peft_export = mergeable = True
    weight_change = LORA_CHANGE

    @property
    def conv_layer(self) -> type[AdapterLayer] | None:
        """LoRAPatchConv2d for a spec whose layer is plain LoRALinear (lora, and lora-plus, which differs only in
        its optimizer); subclasses with their own layer (DoRA, DyLoRA, Delta-LoRA, QLoRA) have none."""
        return LoRAPatchConv2d if self.layer is LoRALinear else None
