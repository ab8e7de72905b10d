"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP")
after the attention and the MLP of each timm Swin block, and the `houlsby` method spec:

    y = f(x) + W_up GELU(W_down f(x) + b_down) + b_up,    W_down (m x d),  W_up (d x m),

f being the block's `attn` (WindowAttention, applied to window tokens) or `mlp`, so the adapter
sees the sublayer's output after its last projection and before the block's residual sum, as in
the paper (Fig. 2). W_up and b_up start at zero, so the adapted model starts as the base model;
W_down is drawn from N(0, 0.01^2) truncated at two standard deviations (the paper's near-identity
initialisation) and b_down is zero. Each insertion trains 2 m d + m + d parameters. The GELU makes
the adapter non-linear, so unlike LoRA it cannot be merged into W0; it has no PEFT LoRA layout and
no weight change W - W0 for `analyze`.

The sizes m come from the Linear rank maps of stage 2: the adapter after `<block>.attn` takes the
rank of the targeted Linears under it (`<block>.attn.qkv`, `<block>.attn.proj`), the one after
`<block>.mlp` that of `<block>.mlp.fc1`, `.fc2`; a sublayer holding no targeted Linear gets none.
Wrapping renames the sublayer's modules (`<block>.attn.qkv` becomes `<block>.attn.base_layer.qkv`).
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from orca_lora.adapters.base import Adapter
from orca_lora.adapters.inject import match_targets, replace_modules
from orca_lora.adapters.spec import MethodSpec, register_method, train_embedder_and_head
from orca_lora.config import DEFAULT_TARGETS, Stage3Config

SUBLAYERS = ("attn", "mlp")
INIT_STD = 1e-2


def bottleneck_param_count(features: int, bottleneck: int) -> int:
    """Trainable parameters of one adapter: W_down, W_up and their biases, 2 m d + m + d."""
    return 2 * bottleneck * features + bottleneck + features


class BottleneckAdapter(Adapter):
    """y = f(x) + up(GELU(down(f(x)))) around a frozen sublayer f; dropout on the adapter path only."""

    method = "houlsby"

    def __init__(
        self,
        base_layer: nn.Module,
        features: int,
        bottleneck: int,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= bottleneck <= features:
            raise ValueError(f"bottleneck must be in [1, features] = [1, {features}], got {bottleneck}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        self.adapter_dropout = nn.Dropout(dropout)
        # Initialise on the CPU so the same seed gives the same W_down on every device.
        self.adapter_down = nn.Linear(features, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, features)
        with torch.no_grad():
            nn.init.trunc_normal_(self.adapter_down.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD,
                                  generator=generator)
            for tensor in (self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias):
                tensor.zero_()
        reference = next(base_layer.parameters(), None)
        if reference is not None:
            for projection in (self.adapter_down, self.adapter_up):
                projection.to(device=reference.device, dtype=reference.dtype)
        self.train(base_layer.training)

    @property
    def trainable_param_count(self) -> int:
        return bottleneck_param_count(self.adapter_up.out_features, self.adapter_down.out_features)

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        hidden = self.base_layer(*args, **kwargs)
        return hidden + self.adapter_up(F.gelu(self.adapter_down(self.adapter_dropout(hidden))))

    def merge(self) -> None:
        raise RuntimeError(
            "Houlsby bottleneck adapters cannot be merged into the base weights: the GELU between W_down and "
            "W_up makes them non-linear; keep the adapter layers for inference (or use a LoRA-family method)"
        )

    def extra_repr(self) -> str:
        return (
            f"features={self.adapter_up.out_features}, bottleneck={self.adapter_down.out_features}, "
            f"dropout={self.adapter_dropout.p:g}"
        )


def _sublayer_features(model: nn.Module) -> dict[str, int]:
    """{`<block>.attn` / `<block>.mlp`: the block's width d} for every Swin block of `model`."""
    return {
        f"{name}.{sublayer}": block.dim
        for name, block in model.named_modules() if isinstance(block, SwinTransformerBlock)
        for sublayer in SUBLAYERS
    }


def bottleneck_sizes(
    model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, ranks: int | Mapping[str, int] = 8
) -> dict[str, int]:
    """{sublayer name: m}: each sublayer holding targeted Linears gets their rank, which must agree.

    `ranks` is one rank or {Linear name: rank} naming exactly the Linears the targets select.
    """
    matched = match_targets(model, targets)
    per_linear = dict.fromkeys(matched, ranks) if isinstance(ranks, int) else dict(ranks)
    unknown, missing = sorted(set(per_linear) - set(matched)), sorted(set(matched) - set(per_linear))
    if unknown or missing:
        raise KeyError(f"rank map does not fit the targets: unknown modules {unknown}, missing modules {missing}")
    sublayers = _sublayer_features(model)
    found: dict[str, dict[str, int]] = {}
    for name, rank in per_linear.items():
        owner = [sublayer for sublayer in sublayers if name.startswith(f"{sublayer}.")]
        if not owner:
            raise ValueError(
                f"target selects {name!r}, which is not inside a Swin block's {' or '.join(SUBLAYERS)}; Houlsby "
                "adapters sit after those sublayers, so narrow the targets to their Linears"
            )
        found.setdefault(owner[0], {})[name] = int(rank)
    for sublayer, linear_ranks in found.items():
        if len(set(linear_ranks.values())) > 1:
            raise ValueError(
                f"the Linears of {sublayer!r} have different ranks {linear_ranks}; one Houlsby adapter follows "
                "the sublayer, so give them one rank"
            )
    return {sublayer: next(iter(linear_ranks.values())) for sublayer, linear_ranks in found.items()}


def add_bottleneck_adapters(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    ranks: int | Mapping[str, int] = 8,
    *,
    dropout: float = 0.0,
    seed: int = 0,
) -> dict[str, BottleneckAdapter]:
    """Wrap each Swin `attn` / `mlp` holding a targeted Linear in a BottleneckAdapter of the Linears' rank.

    W_down matrices are drawn from one generator seeded with `seed`, in model order; every check runs
    and every adapter is built before the model is touched. Returns {sublayer name: adapter}.
    """
    sizes = bottleneck_sizes(model, targets, ranks)
    features = _sublayer_features(model)
    generator = torch.Generator().manual_seed(seed)
    adapters = {
        name: BottleneckAdapter(model.get_submodule(name), features[name], size, dropout, generator)
        for name, size in sizes.items()
    }
    replace_modules(model, adapters)
    return adapters


def bottleneck_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """{name: adapter} for every BottleneckAdapter in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)}


def mark_only_bottlenecks_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the adapters' down and up projections."""
    model.requires_grad_(False)
    for module in bottleneck_modules(model).values():
        module.adapter_down.requires_grad_(True)
        module.adapter_up.requires_grad_(True)


@register_method
class Houlsby(MethodSpec):
    name = "houlsby"

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        """Wraps each block's attn / mlp holding targeted Linears, not the Linears themselves."""
        add_bottleneck_adapters(model, stage3.targets, dict(ranks), dropout=stage3.dropout, seed=seed)
        mark_only_bottlenecks_trainable(model)
        train_embedder_and_head(model)
