"""Put adapter layers into a model: target matching, per-module ranks, trainable marking, merging;
and `LinearAdapterMethod`, the spec of every method whose layer wraps the targeted nn.Linears.

Targets are regexes searched (re.search) against full module names from `model.named_modules()`;
every target must select at least one module and only nn.Linear modules or patchify Conv2ds
(kernel = stride, conv_lora.py), which only a method with a `conv_layer` (plain LoRA) adapts. Ranks
are one int for all targets or a map {module name: rank}; a map must name exactly the matched
modules unless `default_rank` fills the ones it leaves out, and a key naming no matched module is an
error.
"""

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer, describe_matrix, weight_matrix_shape
from orca_lora.adapters.conv_lora import PATCHIFY, is_patchify_conv, patchify_conv_problems
from orca_lora.adapters.spec import MethodSpec, get_method, train_embedder_and_head
from orca_lora.config import DEFAULT_TARGETS, Stage3Config


def is_adaptable(module: nn.Module) -> bool:
    """Whether an adapter layer can wrap `module`: an nn.Linear or a patchify Conv2d (conv_lora.py)."""
    return isinstance(module, nn.Linear) or is_patchify_conv(module)


def match_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear | nn.Conv2d]:
    """{name: module} of the nn.Linear modules and patchify Conv2ds that the regexes select, in model order."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of regexes, got {targets!r}")
    patterns = [re.compile(target) for target in targets]
    matched: dict[str, nn.Linear | nn.Conv2d] = {}
    hits = dict.fromkeys(targets, 0)
    for name, module in model.named_modules():
        for target, pattern in zip(targets, patterns):
            if not pattern.search(name):
                continue
            if isinstance(module, AdapterLayer):
                raise ValueError(f"target {target!r} selects {name!r}, which already has an adapter")
            if not is_adaptable(module):
                conv = isinstance(module, nn.Conv2d)
                settings = f" with {', '.join(patchify_conv_problems(module))}" if conv else ""
                raise ValueError(
                    f"target {target!r} selects {name!r}, a {type(module).__name__}{settings}; only nn.Linear "
                    f"modules or a patchify Conv2d ({PATCHIFY}) can take adapters, so anchor the regex "
                    "(e.g. r'\\.attn\\.qkv$')"
                )
            hits[target] += 1
            matched[name] = module
    unmatched = [target for target, count in hits.items() if count == 0]
    if unmatched:
        raise ValueError(f"targets {unmatched} match no module of {type(model).__name__}")
    return matched


def _resolve_ranks(
    matched: Mapping[str, nn.Linear | nn.Conv2d], ranks: int | Mapping[str, int], default_rank: int | None
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
        d_out, d_in = weight_matrix_shape(matched[name])
        if not 1 <= rank <= min(d_out, d_in):
            raise ValueError(
                f"rank {rank} for {name!r} ({describe_matrix(matched[name])}) is out of range; "
                f"it must be in [1, {min(d_out, d_in)}]"
            )
    return resolved


def add_adapters(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    ranks: int | Mapping[str, int] = 8,
    method: str = "lora",
    alpha: float = 16.0,
    *,
    default_rank: int | None = None,
    seed: int = 0,
    **options: object,
) -> dict[str, AdapterLayer]:
    """Replace each module selected by `targets` in place by the `method`'s layer wrapping it: its
    `layer` for an nn.Linear, its `conv_layer` for a patchify Conv2d (plain LoRA only).

    `ranks` is one rank or {module name: rank}; `default_rank` covers modules a map leaves out.
    `options` go to the layer class (use_rslora, dropout; DyLoRA: min_rank, frozen). The A
    matrices are drawn from one generator seeded with `seed`, in model order. Every check runs and
    every layer is built before the model is touched. Returns {name: adapter layer}.
    """
    spec = get_method(method)
    if not isinstance(spec, LinearAdapterMethod):
        raise ValueError(f"method {method!r} puts no adapter layer on a Linear; get_method({method!r}).prepare "
                         "sets a model up for it")
    matched = match_targets(model, targets)
    convs = [name for name, module in matched.items() if isinstance(module, nn.Conv2d)]
    if convs and spec.conv_layer is None:
        raise ValueError(f"method {method} adapts nn.Linear modules only; {', '.join(convs)} "
                         f"{'is a Conv2d' if len(convs) == 1 else 'are Conv2ds'}: use method lora or target "
                         "Linear modules")
    resolved = _resolve_ranks(matched, ranks, default_rank)
    generator = torch.Generator().manual_seed(seed)
    adapters = {
        name: (spec.conv_layer if name in convs else spec.layer)(
            module, resolved[name], alpha, generator=generator, **options)
        for name, module in matched.items()
    }
    replace_modules(model, adapters)
    return adapters


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Put each module of `replacements` in place of the submodule with its name."""
    for name, module in replacements.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, module)


def adapter_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """{name: adapter layer} for every adapter layer in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter except those each adapter layer names in `adapter_parameter_names`."""
    model.requires_grad_(False)
    for module in adapter_modules(model).values():
        for name in module.adapter_parameter_names:
            module.get_parameter(name).requires_grad_(True)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with requires_grad (shared parameters counted once)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (see AdapterLayer.merge)."""
    for module in adapter_modules(model).values():
        module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters (see AdapterLayer.unmerge)."""
    for module in adapter_modules(model).values():
        module.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors keyed as in model.state_dict(): `<module>.<name>` for each name in the layer's
    `saved_tensor_names` (its trained parameters; Delta-LoRA adds `base_layer.weight`, which its
    training moves). The tensors are detached views of the live parameters, not copies."""
    return {
        f"{name}.{tensor_name}": module.get_parameter(tensor_name).detach()
        for name, module in adapter_modules(model).items()
        for tensor_name in module.saved_tensor_names
    }


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


class LinearAdapterMethod(MethodSpec):
    """A method whose `layer` wraps each targeted nn.Linear (and `conv_layer`, where it has one, each
    targeted patchify Conv2d); the embedder and head train beside it."""

    layer: type[AdapterLayer]

    @property
    def conv_layer(self) -> type[AdapterLayer] | None:
        """The layer for a targeted patchify Conv2d; None: the method adapts nn.Linear modules only."""
        return None

    def options(self, stage3: Stage3Config) -> dict:
        """The layer's keyword arguments, read from stage3."""
        return {"alpha": stage3.alpha, "use_rslora": stage3.rslora, "dropout": stage3.dropout}

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        add_adapters(model, stage3.targets, dict(ranks), self.name, seed=seed, **self.options(stage3))
        mark_only_adapters_trainable(model)
        train_embedder_and_head(model)
