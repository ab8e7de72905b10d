"""Stage 3, refine: put adapters on the frozen body and fine-tune with Lightning (DESIGN 7).

Model selection (best checkpoint, early stopping) uses the validation split carved from the
training data; the test split is touched once, at the end, with the best checkpoint.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from orca_lora.adapters.inject import (
    add_adapters,
    count_trainable,
    mark_only_adapters_trainable,
    merge_adapters,
)
from orca_lora.adapters.io import save_peft_adapter
from orca_lora.config import ADAPTER_METHODS, Stage3Config, TrainerConfig
from orca_lora.data.tasks import TaskData
from orca_lora.files import save_tensors_atomic
from orca_lora.finetune.module import FinetuneModule

log = logging.getLogger("orca_lora")


@dataclass
class FinetuneResult:
    test_error: float
    best_val_error: float
    trainable_params: int
    best_checkpoint: str
    device: str


def variant_options(stage: Stage3Config) -> dict:
    options = {"alpha": stage.alpha, "use_rslora": stage.rslora, "dropout": stage.dropout}
    if stage.method == "dylora":
        options.update(min_rank=stage.dylora_min_rank, frozen=stage.dylora_frozen)
    return options


def prepare_model(model: nn.Module, stage: Stage3Config, ranks: Mapping[str, int], seed: int = 0) -> nn.Module:
    """Adapters for the LoRA family (A drawn from `seed`); everything trains for `full`; only the head
    for `linear`."""
    if stage.method in ADAPTER_METHODS:
        add_adapters(model, targets=stage.targets, ranks=dict(ranks), variant=stage.method, seed=seed,
                     **variant_options(stage))
        mark_only_adapters_trainable(model)
        model.embedder.requires_grad_(True)
        model.head.requires_grad_(True)
    elif stage.method == "full":
        model.requires_grad_(True)
        model.body.patch_embed.requires_grad_(False)  # replaced by the embedder; unused in forward
    else:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    return model.train()


def loaders(task: TaskData, batch_size: int, workers: int, seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    def loader(dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)
    return loader(task.train, True), loader(task.val, False), loader(task.test, False)


def make_trainer(trainer_config: TrainerConfig, stage: Stage3Config, directory: Path) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(dirpath=directory / "checkpoints", filename="best", monitor="val_error",
                                 mode="min", save_last=True)
    callbacks = [checkpoint]
    if stage.early_stopping_patience > 0:
        callbacks.append(EarlyStopping("val_error", patience=stage.early_stopping_patience, mode="min"))
    t = trainer_config
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, max_epochs=t.max_epochs, limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches, limit_test_batches=t.limit_test_batches,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.enable_progress_bar,
        gradient_clip_val=stage.grad_clip or None, logger=CSVLogger(directory, name="logs", version=0),
        callbacks=callbacks, enable_model_summary=False, deterministic="warn",
    )
    return trainer, checkpoint


def run(stage: Stage3Config, trainer_config: TrainerConfig, model: nn.Module, ranks: Mapping[str, int],
        task: TaskData, seed: int, directory: Path) -> FinetuneResult:
    """Fine-tune `model`; resume from `checkpoints/last.ckpt` when a previous attempt was killed."""
    L.seed_everything(seed, workers=True, verbose=False)
    prepare_model(model, stage, ranks, seed)
    train, val, test = loaders(task, stage.batch_size, trainer_config.num_workers, seed)
    steps_per_epoch = _steps_per_epoch(len(train), trainer_config.limit_train_batches)
    module = FinetuneModule(model, task, stage, steps_per_epoch * trainer_config.max_epochs, steps_per_epoch, seed)
    trainer, checkpoint = make_trainer(trainer_config, stage, directory)
    last = directory / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming stage 3 from %s", last)
    trainer.fit(module, train, val, ckpt_path=str(last) if last.is_file() else None)
    best = checkpoint.best_model_path or str(last)
    tested = trainer.test(module, test, ckpt_path=best, verbose=False)
    if trainer.is_global_zero:
        save_trained_weights(module, model, stage, directory)
    return FinetuneResult(
        test_error=float(tested[0]["test_error"]),
        best_val_error=float(checkpoint.best_model_score if checkpoint.best_model_score is not None else math.nan),
        trainable_params=count_trainable(model), best_checkpoint=best, device=str(module.device),
    )


def _steps_per_epoch(batches: int, limit: int | float) -> int:
    """Lightning's rule: an int limit is a batch count, a float a fraction of the batches."""
    count = limit if isinstance(limit, int) else int(batches * limit)
    return max(1, min(batches, count))


def save_trained_weights(module: FinetuneModule, model: nn.Module, stage: Stage3Config, directory: Path) -> None:
    """`trainable.safetensors` (what training changed), the PEFT adapter, and the merged model on request."""
    keep = module.saved_keys()
    save_tensors_atomic({k: v for k, v in module.state_dict().items() if k in keep},
                        directory / "trainable.safetensors")
    if stage.method in ADAPTER_METHODS:
        save_peft_adapter(model, directory / "adapter")
        if stage.save_merged:
            merge_adapters(model)
            save_tensors_atomic(model.state_dict(), directory / "merged.safetensors")
