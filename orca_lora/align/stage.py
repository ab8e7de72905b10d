"""Stage 1, align: train the target embedder f_t so its features match the source's (ORCA, DESIGN 5).

Source features are the pretrained body's own patch embedding of the source proxy images,
mean-pooled over tokens, computed once. Target features are the embedder's, mean-pooled. The
configured distance (OTDD or MMD) between the two labelled feature sets is the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from orca_lora.align.distances import DISTANCES, prepare_source
from orca_lora.align.pseudo_labels import kmeans_labels
from orca_lora.config import Stage1Config, TrainerConfig
from orca_lora.data.tasks import TaskData
from orca_lora.files import save_tensors_atomic, write_text_atomic
from orca_lora.models.embedder import Embedder, mean_pool


@dataclass
class AlignResult:
    embedder_path: Path
    curve: list[float]  # distance over the alignment set: entry 0 before training, then one per epoch
    distance_before: float
    distance_after: float


def source_tokens(body: nn.Module, images: Tensor) -> Tensor:
    """The source body's own patch-embedding tokens (NHWC) of images resized to its input size."""
    size = tuple(body.patch_embed.img_size)
    with torch.no_grad():
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return body.patch_embed(images)


def source_features(body: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Mean-pooled `source_tokens`, computed in batches."""
    return torch.cat([mean_pool(source_tokens(body, batch)) for batch in images.split(batch_size)])


def alignment_set(task: TaskData, max_samples: int, n_pseudo_labels: int, seed: int) -> tuple[Tensor, Tensor]:
    """Target inputs for alignment with labels: true classes, or k-means clusters of the outputs."""
    count = min(max_samples, len(task.train))
    chosen = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))[:count]
    inputs, targets = zip(*(task.train[int(i)] for i in chosen))
    inputs, targets = torch.stack(inputs), torch.stack([torch.as_tensor(t) for t in targets])
    if task.regression:
        targets = kmeans_labels(targets.flatten(1).float(), min(n_pseudo_labels, count), seed=seed)
    return inputs, targets.long()


def distance_options(distance: str, align: Stage1Config, seed: int) -> dict:
    """The config values each registered distance takes (stage 2 measures with stage 1's OTDD settings)."""
    return {"otdd": {"inner": align.otdd_inner, "entropic_reg": align.entropic_reg},
            "c2st": {"seed": seed}}.get(distance, {})


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
        self.options = distance_options(stage.distance, stage, seed)
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
        directory: Path) -> AlignResult:
    """Train `embedder` in place for `stage.epochs`; write its weights and the alignment curve."""
    directory.mkdir(parents=True, exist_ok=True)
    target_x, target_y = alignment_set(task, stage.max_samples, stage.n_pseudo_labels, seed)
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
    path = directory / "embedder.safetensors"
    save_tensors_atomic(embedder.state_dict(), path)
    rows = "\n".join(f"{epoch},{value:.6g}" for epoch, value in enumerate(curve))
    write_text_atomic(directory / "alignment.csv", f"epoch,{stage.distance}\n{rows}\n")
    return AlignResult(path, curve, curve[0], curve[-1])


class _EpochEnd(L.Callback):
    def __init__(self, measure):
        self.measure = measure

    def on_train_epoch_end(self, trainer, module):
        self.measure()
