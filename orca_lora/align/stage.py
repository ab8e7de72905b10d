"""Stage 1, align: train the target embedder f_t so its features match the source's
(ORCA: Shen et al. 2023; README, "Stage 1: align").

Source features are the pretrained body's own patch embedding of the source proxy images,
mean-pooled over tokens, computed once. Target features are the embedder's, mean-pooled. The
configured distance (OTDD or MMD) between the two labelled feature sets is the loss.
"""
from __future__ import annotations

import shutil

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from orca_lora.align.distances import DISTANCES, distance_options, prepare_source
from orca_lora.config import Stage1Config, TrainerConfig
from orca_lora.data.tasks import TaskData
from orca_lora.files import save_tensors_atomic
from orca_lora.models.embedder import Embedder, mean_pool
from orca_lora.models.features import labelled_target_sample, source_features
from orca_lora.records import AlignResult
from orca_lora.run_files import RunFiles, write_alignment


class AlignModule(L.LightningModule):
    def __init__(self, embedder: Embedder, source_x: Tensor, source_y: Tensor, stage: Stage1Config, seed: int):
        super().__init__()
        entry = DISTANCES[stage.distance]
        if not entry.differentiable:
            raise ValueError(f"stage1.distance: {stage.distance!r} is not differentiable; use otdd or mmd")
        self.embedder = embedder
        self.register_buffer("source_x", source_x)
        self.register_buffer("source_y", source_y)
        self.stage, self.distance_fn = stage, entry.fn
        self.options = distance_options(stage.distance, stage.otdd_inner, stage.entropic_reg, seed,
                                        stage.sinkhorn_tolerance, stage.sinkhorn_max_iters)
        self.source_cache = None

    def distance(self, target_x: Tensor, target_y: Tensor) -> Tensor:
        features = mean_pool(self.embedder(target_x))
        options = dict(self.options)
        if self.stage.distance == "otdd":
            # the source side of OTDD (class split, OT(source, source)) is a constant: compute it once
            if self.source_cache is None or self.source_cache.features.device != features.device:
                self.source_cache = prepare_source(self.source_x, self.source_y, **self.options)
            options["source"] = self.source_cache
        return self.distance_fn(self.source_x, self.source_y, features, target_y, **options)

    def training_step(self, batch, batch_index):
        loss = self.distance(*batch)
        self.log("train_distance", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.embedder.parameters(), lr=self.stage.lr,
                                 weight_decay=self.stage.weight_decay)


def run(stage: Stage1Config, trainer_config: TrainerConfig, body: nn.Module, task: TaskData,
        embedder: Embedder, source_images: Tensor, source_labels: Tensor, seed: int,
        run_files: RunFiles) -> AlignResult:
    """Train `embedder` in place for `stage.epochs`; write its weights and the alignment curve."""
    directory = run_files.stage("stage1")
    # stage 1 always starts over: a killed attempt's logs would otherwise stand beside this one's
    shutil.rmtree(directory / "logs", ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    target_x, target_y = labelled_target_sample(task, stage.max_samples, stage.n_pseudo_labels, seed)
    module = AlignModule(embedder, source_features(body, source_images), source_labels.long(), stage, seed)
    curve: list[float] = []

    def measure() -> None:
        with torch.no_grad():
            curve.append(float(module.distance(target_x.to(module.device), target_y.to(module.device))))

    measure()
    if stage.epochs > 0:
        L.seed_everything(seed, workers=True, verbose=False)
        loader = DataLoader(TensorDataset(target_x, target_y), batch_size=stage.batch_size, shuffle=True,
                            drop_last=len(target_x) > stage.batch_size,
                            generator=torch.Generator().manual_seed(seed))
        trainer = L.Trainer(
            max_epochs=stage.epochs, accelerator=trainer_config.accelerator, devices=1,
            logger=CSVLogger(directory, name="logs"), enable_checkpointing=False,
            enable_progress_bar=trainer_config.enable_progress_bar, enable_model_summary=False,
            log_every_n_steps=1, callbacks=[_EpochEnd(measure)],
        )
        trainer.fit(module, loader)
        module.cpu()
    save_tensors_atomic(embedder.state_dict(), run_files.embedder)
    write_alignment(run_files, stage.distance, curve)
    return AlignResult(curve, curve[0], curve[-1])


class _EpochEnd(L.Callback):
    def __init__(self, measure):
        self.measure = measure

    def on_train_epoch_end(self, trainer, module):
        self.measure()
