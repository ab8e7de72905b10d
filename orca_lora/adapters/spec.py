"""Stage-3 methods as specs (PEFT's `LoraVariant` idea;
README, "Adding a method, task, allocation or distance"): one object per method owns
what stage 3, saving and `analyze` need to know about it: how it goes into the model and what
trains, its validation, its optimizer hooks, whether it exports to PEFT or merges, and its
weight-change rule.

Each method's module subclasses MethodSpec (Linear adapters: inject.LinearAdapterMethod) and
decorates it with @register_method. Importing `orca_lora.adapters` imports every module of the
package, so the registry is full once anything from it is imported; its names must equal
`orca_lora.choices.METHODS`, the torch-free table that config validation checks names against.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

from orca_lora import choices
from orca_lora.adapters.optim import adapter_param_groups
from orca_lora.config import ConfigError, Stage2Config, Stage3Config
from orca_lora.registry import registrar


@dataclass(frozen=True)
class WeightChange:
    """How a method's saved tensors of one module (keys relative to it, as in `needs`) give
    E = W_trained - W0: compute(params, frozen_weight, stage3), where frozen_weight() loads W0."""

    needs: tuple[str, ...]
    compute: Callable[[Mapping[str, Tensor], Callable[[], Tensor], Stage3Config], Tensor]


@dataclass(frozen=True)
class PosteriorRanks:
    """What a method that infers its ranks (ibp-lora) reports after training: module -> posterior
    rank, and module -> its truncation r_max (the cap a posterior rank cannot exceed)."""

    ranks: dict[str, int]
    caps: dict[str, int]


class StepHook(Protocol):
    """Optimizer hooks that count the steps they have seen; a resumed run sets `step`."""

    step: int


class MethodSpec(ABC):
    """One stage-3 method. Subclasses set `name` and the flags and override the hooks they need."""

    name: str
    uses_targets: bool = True  # adapts the body modules stage3.targets select (checked before stage 1)
    peft_export: bool = False  # stage 3 also writes the adapters in PEFT's LoRA layout
    mergeable: bool = False  # stage3.save_merged can fold the update into the base weights
    weight_change: WeightChange | None = None  # `analyze`'s rule; None: no body weight changes to analyse

    def validate(self, stage3: Stage3Config) -> None:
        """Raise ConfigError naming the key when `stage3` asks for what this method cannot do."""
        if stage3.save_merged and not self.mergeable:
            raise ConfigError(f"stage3.save_merged: {self.name} has no adapters to merge into the base weights; "
                              "set it to false")

    def validate_ranks(self, stage2: Stage2Config) -> None:
        """Raise ConfigError naming the key when stage 2 cannot give this method what it reads from it."""

    @abstractmethod
    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        """Put the method's layers into the OrcaModel (random parts drawn from `seed`) and mark what trains.
        `prior_masses` (module -> stage 2's IBP mass alpha_i) is read only by methods that infer ranks."""

    def param_groups(self, module: nn.Module, stage3: Stage3Config) -> list[dict]:
        """AdamW groups of the trainable parameters of `module`."""
        return adapter_param_groups(module, stage3.lr, stage3.weight_decay)

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module, stage3: Stage3Config) -> StepHook | None:
        """Hooks on stage 3's optimizer, once it is built; None for methods that need none."""
        return None

    def on_train_batch_start(self, model: nn.Module, generator: torch.Generator) -> None:
        """Called before every training step, with stage 3's own seeded generator."""

    def regularizer(self, model: nn.Module) -> Tensor | None:
        """A term stage 3 adds to the training loss, divided by the training set's size (ibp-lora's
        KL, which makes the loss a negative ELBO per sample); None for methods that add none."""
        return None

    def penalty(self, model: nn.Module) -> Tensor | None:
        """A term stage 3 adds to the training loss as it is (AdaLoRA's orthogonality penalty, which
        PEFT adds only inside AdaLoraModel.forward, a forward our loop does not call); None for most."""
        return None

    def finalize(self, model: nn.Module) -> PosteriorRanks | None:
        """Called once the best checkpoint is restored, before the test split is scored: turn the trained
        layers into the ones the result reports (ibp-lora prunes to its posterior ranks)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


METHODS: dict[str, MethodSpec] = {}
_register = registrar(METHODS)


def register_method(cls: type[MethodSpec]) -> type[MethodSpec]:
    """Class decorator filing one instance of the spec under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _register(cls.name)(cls())
    return cls


def get_method(name: str) -> MethodSpec:
    """The spec registered under `name`; KeyError listing the registered names otherwise."""
    choices.check_registry("stage-3 method", METHODS, choices.METHODS)
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def train_embedder_and_head(model: nn.Module) -> None:
    """The adapter methods train the OrcaModel's embedder and head beside their adapters."""
    model.embedder.requires_grad_(True)
    model.head.requires_grad_(True)
