"""DyLoRA (Valipour et al. 2023): one LoRA trained at every rank b in [r_min, r_max] at once, and the
`dylora` method spec.

Each training step draws b ~ U{min_rank..rank} per layer and uses the first b components scaled
alpha / b: h = W0 x + (alpha/b) B[:, :b] A[:b] x. Evaluation uses `eval_rank` (any b <= r_max); stage 3
evaluates and saves at r_max, so `analyze` reads it as the plain LoRA s B A.
"""

import torch
from torch import Tensor, nn

from orca_lora.adapters.base import lora_scaling
from orca_lora.adapters.lora import LoRA, LoRALinear
from orca_lora.adapters.spec import register_method
from orca_lora.config import ConfigError, Stage3Config


class DyLoRALinear(LoRALinear):
    """DyLoRA: trains ranks b ~ U{min_rank..rank} at once, h = W0 x + (alpha/b) B[:, :b] A[:b] x.

    `rank` is r_max. Training uses the rank last drawn by sample_rank(); evaluation uses `eval_rank`
    (any b <= r_max). With `frozen`, only component b (row b of A, column b of B) gets gradients.
    """

    method = "dylora"

    def init_adapter(self, generator: torch.Generator | None, *, min_rank: int = 1, frozen: bool = False) -> None:
        super().init_adapter(generator)
        if not 1 <= min_rank <= self.rank:
            raise ValueError(f"min_rank must be in [1, rank] = [1, {self.rank}], got {min_rank}")
        self.min_rank, self.frozen = min_rank, frozen
        self._train_rank = self._eval_rank = self._merged_rank = self.rank

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
    def peft_rank(self) -> int:
        """PEFT holds the first eval_rank components, a plain LoRA whose scale alpha / b is DyLoRA's own."""
        return self._eval_rank

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


@register_method
class DyLoRA(LoRA):
    name, layer = "dylora", DyLoRALinear

    def options(self, stage3: Stage3Config) -> dict:
        return {**super().options(stage3), "min_rank": stage3.dylora_min_rank, "frozen": stage3.dylora_frozen}

    def validate(self, stage3: Stage3Config) -> None:
        super().validate(stage3)
        if stage3.dylora_min_rank > stage3.rank:
            raise ConfigError(f"stage3.dylora_min_rank: {stage3.dylora_min_rank} exceeds stage3.rank {stage3.rank}")

    def on_train_batch_start(self, model: nn.Module, generator: torch.Generator) -> None:
        """Each DyLoRA layer draws its own b ~ U{min_rank..r_max}, in model order."""
        for module in model.modules():
            if isinstance(module, DyLoRALinear):
                module.sample_rank(generator)
