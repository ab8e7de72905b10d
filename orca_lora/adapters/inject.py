"""Put adapter layers into a model: target matching, per-module ranks, trainable marking, merging.

Targets are regexes searched (re.search) against full module names from `model.named_modules()`;
every target must select at least one module and only nn.Linear modules. Ranks are one int for all
targets or a map {module name: rank}; a map must name exactly the matched modules unless
`default_rank` fills the ones it leaves out, and a key naming no matched module is an error.
"""

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from orca_lora.adapters.lora import DeltaLoRALinear, LoRALinear, get_variant

DEFAULT_TARGETS = (r"\.attn\.qkv$", r"\.attn\.proj$", r"\.mlp\.fc1$", r"\.mlp\.fc2$")

_ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector", "mora_M")


def match_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """{name: module} of the nn.Linear modules that the regexes select, in model order."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of regexes, got {targets!r}")
    patterns = [re.compile(target) for target in targets]
    matched: dict[str, nn.Linear] = {}
    hits = dict.fromkeys(targets, 0)
    for name, module in model.named_modules():
        for target, pattern in zip(targets, patterns):
            if not pattern.search(name):
                continue
            if isinstance(module, LoRALinear):
                raise ValueError(f"target {target!r} selects {name!r}, which already has an adapter")
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"target {target!r} selects {name!r}, a {type(module).__name__}; only nn.Linear modules "
                    "can take adapters, so anchor the regex (e.g. r'\\.attn\\.qkv$')"
                )
            hits[target] += 1
            matched[name] = module
    unmatched = [target for target, count in hits.items() if count == 0]
    if unmatched:
        raise ValueError(f"targets {unmatched} match no module of {type(model).__name__}")
    return matched


def _resolve_ranks(
    matched: Mapping[str, nn.Linear], ranks: int | Mapping[str, int], default_rank: int | None
) -> dict[str, int]:
    if isinstance(ranks, int):
        resolved = dict.fromkeys(matched, ranks)
    else:
        unknown = sorted(set(ranks) - set(matched))
        if unknown:
            raise KeyError(f"rank map names modules that the targets do not select: {unknown}")
        missing = [name for name in matched if name not in ranks]
        if missing and default_rank is None:
            raise KeyError(f"rank map misses matched modules {missing}; add them or pass default_rank")
        resolved = {name: int(ranks.get(name, default_rank)) for name in matched}
    for name, rank in resolved.items():
        d_out, d_in = matched[name].weight.shape
        if not 1 <= rank <= min(d_out, d_in):
            raise ValueError(
                f"rank {rank} for {name!r} (Linear of shape ({d_out}, {d_in})) is out of range; "
                f"it must be in [1, {min(d_out, d_in)}]"
            )
    return resolved


def add_adapters(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    ranks: int | Mapping[str, int] = 8,
    variant: str = "lora",
    alpha: float = 16.0,
    *,
    default_rank: int | None = None,
    seed: int = 0,
    **variant_options: object,
) -> dict[str, LoRALinear]:
    """Replace each nn.Linear selected by `targets` in place by the `variant` layer wrapping it.

    `ranks` is one rank or {module name: rank}; `default_rank` covers modules a map leaves out.
    `variant_options` go to the layer class (use_rslora, dropout; DyLoRA: min_rank, frozen). The A
    matrices are drawn from one generator seeded with `seed`, in model order. Every check runs and
    every layer is built before the model is touched. Returns {name: adapter layer}.
    """
    layer_class = get_variant(variant)
    matched = match_targets(model, targets)
    resolved = _resolve_ranks(matched, ranks, default_rank)
    generator = torch.Generator().manual_seed(seed)
    adapters = {
        name: layer_class(module, resolved[name], alpha, generator=generator, **variant_options)
        for name, module in matched.items()
    }
    replace_modules(model, adapters)
    return adapters


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Put each module of `replacements` in place of the submodule with its name."""
    for name, module in replacements.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, module)


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{name: adapter layer} for every adapter layer in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the adapters' (lora_A, lora_B, DoRA magnitudes, MoRA's M)."""
    model.requires_grad_(False)
    for module in adapter_modules(model).values():
        for name in _ADAPTER_PARAMS:
            param = getattr(module, name, None)
            if param is not None:
                param.requires_grad_(True)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with requires_grad (shared parameters counted once)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (see LoRALinear.merge)."""
    for module in adapter_modules(model).values():
        module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters (see LoRALinear.unmerge)."""
    for module in adapter_modules(model).values():
        module.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors keyed as in model.state_dict(): `<module>.lora_A`, `<module>.lora_B`,
    `<module>.lora_magnitude_vector` (DoRA), `<module>.mora_M` (MoRA), and `<module>.base_layer.weight`
    for Delta-LoRA layers, whose W0 training moves. The tensors are detached views of the live
    parameters, not copies."""
    state: dict[str, Tensor] = {}
    for name, module in adapter_modules(model).items():
        for param_name in _ADAPTER_PARAMS:
            param = getattr(module, param_name, None)
            if param is not None:
                state[f"{name}.{param_name}"] = param.detach()
        if isinstance(module, DeltaLoRALinear):
            state[f"{name}.base_layer.weight"] = module.base_layer.weight.detach()
    return state


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy `state` (as from adapter_state_dict) into the model's adapters; keys and shapes must match."""
    merged = [name for name, module in adapter_modules(model).items() if module.merged]
    if merged:
        raise RuntimeError(f"adapters {merged} are merged; call unmerge_adapters(model) before loading")
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"adapter state does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    for key, tensor in own.items():
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"{key!r}: the state holds shape {tuple(state[key].shape)}, the model {tuple(tensor.shape)}"
            )
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])
