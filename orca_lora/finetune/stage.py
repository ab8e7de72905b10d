"""Stage 3, refine: put adapters on the frozen body and fine-tune with Lightning (README, "Stage 3: refine").

Model selection (best checkpoint, early stopping) uses the validation split carved from the
training data; the test split is touched once, at the end, with the best checkpoint, once the
method has finalized it (ibp-lora prunes to its posterior ranks first; the test error, saved weights
and parameter count are the pruned model's).
"""
from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from orca_lora.adapters.inject import adapter_modules, count_trainable, mark_only_adapters_trainable, merge_adapters
from orca_lora.adapters.io import save_peft_adapter
from orca_lora.adapters.spec import MethodSpec, get_method
from orca_lora.config import ConfigError, Stage3Config, TrainerConfig
from orca_lora.data.tasks import TaskData
from orca_lora.errors import TrainingDiverged
from orca_lora.files import save_tensors_atomic
from orca_lora.finetune.allocations import (
    AllocationRequest,
    AllocationSetup,
    plan_allocation,
    ranks_record,
    tested_ranks,
)
from orca_lora.finetune.checkpoints import AtomicCheckpointIO, SameResume, resumable_checkpoint
from orca_lora.finetune.module import FinetuneModule
from orca_lora.rank.select import ModuleShape
from orca_lora.rank.stage import adapted_module_shapes
from orca_lora.records import FinetuneResult, SampleErrors
from orca_lora.run_files import RunFiles, training_log_before, write_sample_errors, write_training_ranks

log = logging.getLogger("orca_lora")


def prepare_model(model: nn.Module, stage: Stage3Config, ranks: Mapping[str, int], seed: int = 0,
                  prior_masses: Mapping[str, float] | None = None, method: MethodSpec | None = None) -> nn.Module:
    """The method's layers in `model` (their random parts drawn from `seed`) and what trains marked,
    as its spec says: adapters, embedder and head for the adapter methods; all but the unused patch
    embedding for `full`; only the head for `linear`. `prior_masses` (stage 2's IBP mass per module)
    is read by ibp-lora only. `method`: a stage-3 allocation's spec; None: stage3.method's.
    `stage3.train_embedder: false` keeps the embedder as stage 1 left it, whatever the method trains
    (ORCA's Table 2 regime, Shen et al. 2023: only what the method adds, and the head, adapt)."""
    (method or get_method(stage.method)).prepare(model, stage, ranks, seed, prior_masses=prior_masses)
    if not stage.train_embedder:  # an adapter on the embedder's projection still trains
        mark_only_adapters_trainable(model.embedder)
    model.train()
    if not stage.body_stochastic_depth:  # Lightning restores each module's own mode after validating
        model.body.eval()
    return model


def allocate_and_prepare(model: nn.Module, stage: Stage3Config, ranks: Mapping[str, int], task: TaskData, seed: int,
                         prior_masses: Mapping[str, float] | None, allocation: AllocationRequest | None,
                         shapes: Mapping[str, ModuleShape], total_steps: int, device: torch.device) -> MethodSpec:
    """Prepare `model` at stage 2's `ranks`, or, for a stage-3 allocation, at the ranks and with the
    spec it computes on the model as it will train (before any adapter is in); returns the spec."""
    if allocation is None:
        method = get_method(stage.method)
    else:
        plan = plan_allocation(AllocationSetup(model, task, stage, shapes, allocation, seed, total_steps, device))
        ranks, method = plan.ranks, plan.method
    prepare_model(model, stage, ranks, seed, prior_masses, method)
    return method


@dataclass
class ProcessPlacement:
    global_rank: int
    world_size: int


def process_placement(trainer_config: TrainerConfig) -> ProcessPlacement:
    """This process's global rank and the number of processes stage 3 trains on, as Lightning resolves
    them from `trainer_config` and the launcher's environment: LOCAL_RANK / NODE_RANK from Lightning's own
    `ddp` launcher, RANK / WORLD_SIZE from torchrun, SLURM_PROCID from srun. Launches nothing.

    Every process must run the whole pipeline, so strategies whose workers run only `fit` (ddp_spawn,
    ddp_fork, ddp_notebook; what `auto` picks for several devices in a notebook) are refused.
    A bad accelerator, device count, strategy or precision fails here, before stage 1.
    """
    t = trainer_config
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # the stage-3 trainer prints the device summary; once is enough
    try:
        probe = L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                          precision=t.precision, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, ValueError) as error:
        raise ConfigError(f"trainer: {error}") from None
    finally:
        lightning_log.setLevel(level)
    if isinstance(probe.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError(f"trainer.strategy: {t.strategy!r} resolves to workers that run only the training call; "
                          "the pipeline needs every process to run it: use 'ddp' from a script or the CLI "
                          "(Lightning re-runs the command once per device), or start the processes with "
                          "torchrun / srun")
    return ProcessPlacement(probe.global_rank, probe.world_size)


def check_world_size(task: TaskData, world_size: int) -> None:
    """Each process must score at least one validation sample, or DDP waits forever (the test split is scored by
    rank 0 alone, once training has ended)."""
    size = len(task.val)
    if 0 < size < world_size:
        raise ValueError(f"the val split has {size} samples, fewer than the {world_size} training processes "
                         "(trainer.devices x trainer.num_nodes); use fewer devices or more data")


class TaskDataModule(L.LightningDataModule):
    """The task's splits as loaders, built in each training process once its rank is known.

    Lightning shards training batches with its padded DistributedSampler. Validation is sharded without
    padding (each sample scored once, shard sizes off by at most one), and the module's error metric sums
    (errors, count) over all ranks, so the error equals a single-process evaluation, where a padded sampler
    would count repeated samples twice.
    """

    def __init__(self, task: TaskData, batch_size: int, workers: int, seed: int):
        super().__init__()
        self.task, self.batch_size, self.workers = task, batch_size, workers
        # one generator for the whole fit, saved in checkpoints: a resumed run shuffles as the one it resumes
        self.generator = torch.Generator().manual_seed(seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.task.train, batch_size=self.batch_size, shuffle=True, num_workers=self.workers,
                          generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def val_dataloader(self) -> DataLoader:
        shard = UnrepeatedDistributedSampler(self.task.val, num_replicas=self.trainer.world_size,
                                             rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.task.val, batch_size=self.batch_size, sampler=shard, num_workers=self.workers)


def stage_loggers(trainer_config: TrainerConfig, directory: Path) -> list[Logger]:
    """The CSV log first, always (`stage3/logs/version_0/metrics.csv`: `run_files.read_training_log` reads it,
    a resumed run keeps its rows through `trainer.logger`, the first logger); with `trainer.logger:
    tensorboard`, TensorBoard's event files in the same folder, which a fresh start clears with it."""
    loggers: list[Logger] = [CSVLogger(directory, name="logs", version=0)]
    if trainer_config.logger == "tensorboard":
        loggers.append(TensorBoardLogger(directory, name="logs", version=0, default_hp_metric=False))
    return loggers


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
        gradient_clip_val=stage.grad_clip or None, logger=stage_loggers(t, directory),
        callbacks=callbacks, enable_model_summary=False, deterministic="warn", plugins=[AtomicCheckpointIO()],
    )
    return trainer, checkpoint


def run(stage: Stage3Config, trainer_config: TrainerConfig, model: nn.Module, ranks: Mapping[str, int],
        task: TaskData, seed: int, run_files: RunFiles, prior_masses: Mapping[str, float] | None = None,
        allocation: AllocationRequest | None = None) -> FinetuneResult:
    """Fine-tune `model`; resume from `checkpoints/last.ckpt` when a previous attempt was killed.

    With a stage-3 `allocation` (gradient, eva, adalora) the ranks are its own, computed before
    training, and the ranks of the model tested go to `stage3/ranks.json`.
    The test split is scored once, with the best checkpoint on validation as the method finalizes it;
    the per-sample validation and test errors of that model are saved for paired comparisons between
    runs. `trainable_params` counts the finalized model, `trained_params` the one that trained."""
    L.seed_everything(seed, workers=True, verbose=False)
    trainer, checkpoint = make_trainer(trainer_config, stage, run_files.stage("stage3"))
    world_size = trainer.world_size
    check_world_size(task, world_size)
    if world_size > 1:
        log.info("stage 3 trains on %d processes (strategy %s)", world_size, trainer_config.strategy)
    # each process sees ceil(n / world_size) training samples per epoch (DistributedSampler pads)
    batches = math.ceil(math.ceil(len(task.train) / world_size) / stage.batch_size)
    steps_per_epoch = _steps_per_epoch(batches, trainer_config.limit_train_batches)
    total_steps = steps_per_epoch * trainer_config.max_epochs
    shapes = adapted_module_shapes(model.body, stage.targets) if allocation is not None else {}
    method = allocate_and_prepare(model, stage, ranks, task, seed, prior_masses, allocation, shapes, total_steps,
                                  trainer.strategy.root_device)
    trained_params = count_trainable(model)
    module = FinetuneModule(model, task, stage, total_steps, steps_per_epoch, seed, method)
    data = TaskDataModule(task, stage.batch_size, trainer_config.num_workers, seed)
    if trained_params:
        best = fit_best(trainer, checkpoint, module, data, run_files)
        load_best(trainer, module, best)
    else:  # `linear` on a parameter-free head (the planted tasks' pooled features): the un-adapted model, rank 0
        log.info("stage 3: %s leaves no parameter to train here: the model is evaluated as prepared", stage.method)
        best = ""
    posterior = module.method.finalize(model)  # ibp-lora prunes to its posterior ranks: that model is tested
    selected_val_error = float(checkpoint.best_model_score if checkpoint.best_model_score is not None else math.nan)
    test_error = tested_val_error = math.nan  # another process of a multi-process run records nothing
    if trainer.is_global_zero:  # the test split is scored here, once, sample by sample (the full split)
        module.to(trainer.strategy.root_device)
        errors = SampleErrors(val=per_sample_errors(module, task.val, stage.batch_size),
                              test=per_sample_errors(module, task.test, stage.batch_size))
        test_error = float(errors.test.mean())
        if not math.isfinite(test_error):
            raise TrainingDiverged(f"stage 3 diverged: the test error is {test_error}; lower stage3.lr, then run "
                                   "again")
        write_sample_errors(run_files, errors)
        tested_val_error = float(errors.val.mean()) if errors.val.size else math.nan
        selected_val_error = selected_val_error if trained_params else tested_val_error
        save_trained_weights(module, model, stage, run_files)
        if allocation is not None:
            write_training_ranks(run_files, ranks_record(tested_ranks(model, shapes), shapes, allocation))
    pruned = posterior is not None and trainer.is_global_zero  # rank 0's result is the one recorded
    return FinetuneResult(
        test_error=test_error,
        # the model tested: for ibp-lora the pruned one; the checkpoint's own (unpruned) score beside it
        best_val_error=tested_val_error if pruned else selected_val_error,
        unpruned_val_error=selected_val_error if pruned else None,
        trainable_params=count_trainable(model), best_checkpoint=best, device=str(module.device),
        trained_params=trained_params, posterior_ranks=None if posterior is None else posterior.ranks,
        posterior_caps=None if posterior is None else posterior.caps,
    )


def fit_best(trainer: L.Trainer, checkpoint: ModelCheckpoint, module: FinetuneModule, data: L.LightningDataModule,
             run_files: RunFiles) -> str:
    """Fit, resuming from `checkpoints/last.ckpt` when a previous attempt was killed; the path of the
    checkpoint best on validation (the last one without a score)."""
    last = run_files.last_checkpoint
    # every process checks the file it would load; rank 0 alone sets a damaged one aside (checkpoints.py)
    resume = resumable_checkpoint(last, run_files.stage("stage3") if trainer.is_global_zero else None)
    if trainer.is_global_zero:
        if resume is not None:
            log.info("resuming stage 3 from %s (step %d)", last, resume.step)
            # Lightning's CSV logger deletes the log it finds: keep the rows the checkpoint had seen
            trainer.logger.experiment.metrics[:0] = training_log_before(run_files, resume.step)
        else:  # a fresh start: no earlier attempt's best-v1.ckpt or log rows
            for stale in (run_files.checkpoints, run_files.training_log.parent):
                shutil.rmtree(stale, ignore_errors=True)
    trainer.callbacks.append(SameResume(last, resume))
    if resume is not None:
        trainer.strategy.checkpoint_io.verified[str(last)] = resume.sha256
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume is not None else None)
    return checkpoint.best_model_path or str(last)


def load_best(trainer: L.Trainer, module: FinetuneModule, best: str) -> None:
    """The weights of checkpoint `best` into `module`, as Lightning restores a checkpoint for testing."""
    saved = trainer.strategy.load_checkpoint(best, weights_only=False)
    module.on_load_checkpoint(saved)
    module.load_state_dict(saved["state_dict"], strict=False)  # checkpoints leave out the frozen body


def _steps_per_epoch(batches: int, limit: int | float) -> int:
    """Lightning's rule: an int limit is a batch count, a float a fraction of the batches."""
    count = limit if isinstance(limit, int) else int(batches * limit)
    return max(1, min(batches, count))


@torch.no_grad()
def per_sample_errors(module: FinetuneModule, dataset, batch_size: int) -> np.ndarray:
    """The task error of every sample of `dataset`, in dataset order (float64), from the module's
    current weights in eval mode; their mean is the error the trainer logs for the split."""
    training = module.training
    module.eval()
    with torch.no_grad():
        errors = [module.error_fn(module(inputs.to(module.device)), targets.to(module.device)).double().cpu()
                  for inputs, targets in DataLoader(dataset, batch_size=batch_size)]
    module.train(training)
    return torch.cat(errors).numpy() if errors else np.zeros(0)


def save_trained_weights(module: FinetuneModule, model: nn.Module, stage: Stage3Config, run_files: RunFiles) -> None:
    """`trainable.safetensors` (what training changed), the PEFT adapter, and the merged model on request."""
    keep = module.saved_keys()
    save_tensors_atomic({k: v for k, v in module.state_dict().items() if k in keep}, run_files.trainable)
    if get_method(stage.method).peft_export:
        if adapter_modules(model):
            save_peft_adapter(model, run_files.adapter)
        else:  # ibp-lora pruned every module to rank 0
            log.info("stage 3: no module kept an adapter, so there is no PEFT adapter to save")
    if stage.save_merged:
        merge_adapters(model)
        save_tensors_atomic(model.state_dict(), run_files.merged)
