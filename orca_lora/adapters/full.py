"""Full fine-tuning, the `full` baseline every method is reported against (README, "Stage 3: refine"): every
weight of the model trains, and `analyze` reads each Linear's change W_full - W0."""

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from orca_lora.adapters.spec import MethodSpec, WeightChange, register_method
from orca_lora.config import Stage3Config


def full_change(params: Mapping[str, Tensor], frozen_weight: Callable[[], Tensor], stage3: Stage3Config) -> Tensor:
    """W_full - W0."""
    return params["weight"].double() - frozen_weight()


@register_method
class FullFineTuning(MethodSpec):
    name = "full"
    uses_targets = False
    weight_change = WeightChange(needs=("weight",), compute=full_change)

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        model.requires_grad_(True)
        model.body.patch_embed.requires_grad_(False)  # replaced by the embedder; unused in forward
