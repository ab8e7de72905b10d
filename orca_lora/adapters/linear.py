"""Linear probing, the `linear` baseline (README, "Stage 3: refine"): only the head trains, so the body's weights
do not change and `analyze` has nothing to read. On a parameter-free head (the planted controls' pooled features)
nothing trains: stage 3 evaluates the un-adapted model, the rank-0 point of a rank sweep."""

from collections.abc import Mapping

from torch import nn

from orca_lora.adapters.spec import MethodSpec, register_method
from orca_lora.config import Stage3Config


@register_method
class LinearProbe(MethodSpec):
    name = "linear"
    uses_targets = False

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
