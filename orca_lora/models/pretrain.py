"""The offline source body (`orca-lora pretrain-source`): a small timm Swin trained on procedural images.

With no hub access, this stands in for ImageNet pretraining: the body learns to tell
FractalDB-style iterated-function-system classes apart, then serves as g_s for every stage.
It expects images as `generate_procedural` makes them: RGB in [0, 1], no normalisation.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.model_selection import train_test_split
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from orca_lora.config import PretrainConfig
from orca_lora.data.procedural import generate_procedural
from orca_lora.files import cache_is_valid, write_digest
from orca_lora.models.body import build_body, load_body, save_body
from orca_lora.models.heads import ClassificationHead

WARMUP_FRACTION = 0.1


@dataclass
class PretrainResult:
    path: Path  # the body's .safetensors file (its .json sidecar lies beside it)
    val_accuracy: float  # on the held-out split of the generated images
    chance_accuracy: float  # the majority class's share of that split
    seconds: float  # data generation + training + validation


def pretrain_model_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    """The timm kwargs that shrink `cfg.model` to the small offline body."""
    return {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "window_size": cfg.window_size,
            "embed_dim": cfg.embed_dim, "depths": list(cfg.depths), "num_heads": list(cfg.num_heads)}


class SourcePretrainModule(L.LightningModule):
    """Body + mean-pool linear classifier, AdamW with linear warm-up then cosine decay per step."""

    def __init__(self, body: nn.Module, n_classes: int, lr: float, weight_decay: float):
        super().__init__()
        self.body = body
        self.head = ClassificationHead(int(body.num_features), n_classes)
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body.forward_features(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        # timm's factory leaves norms, biases and relative-position tables out of weight decay
        optimizer = create_optimizer_v2(self, "adamw", lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=WARMUP_FRACTION, anneal_strategy="cos", cycle_momentum=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _loaders(cfg: PretrainConfig, seed: int) -> tuple[DataLoader, DataLoader, float]:
    data = generate_procedural(cfg.n_classes, cfg.samples_per_class, image_size=cfg.img_size, seed=seed)
    images, labels = torch.as_tensor(data.images), torch.as_tensor(data.labels)
    train_index, val_index = train_test_split(np.arange(len(labels)), test_size=cfg.val_fraction,
                                              random_state=seed, stratify=data.labels)
    train_index, val_index = torch.as_tensor(train_index), torch.as_tensor(val_index)
    chance = float(torch.bincount(labels[val_index]).max()) / len(val_index)
    train = DataLoader(TensorDataset(images[train_index], labels[train_index]), batch_size=cfg.batch_size,
                       shuffle=True, drop_last=len(train_index) > cfg.batch_size,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(images[val_index], labels[val_index]), batch_size=cfg.batch_size)
    return train, val, chance


def pretrain_source(cfg: PretrainConfig, out_path: str | Path, seed: int,
                    trainer_options: Mapping[str, Any] | None = None) -> PretrainResult:
    """Train `cfg`'s small Swin on procedural images from `seed`; save it with save_body at `out_path`."""
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")
    out_path = Path(out_path)
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    model_kwargs = pretrain_model_kwargs(cfg)
    body = build_body(cfg.model, model_kwargs=model_kwargs)
    train, val, chance = _loaders(cfg, seed)
    module = SourcePretrainModule(body, cfg.n_classes, cfg.lr, cfg.weight_decay)
    options = {"accelerator": "auto", "devices": 1, "log_every_n_steps": 5, **(trainer_options or {})}
    trainer = L.Trainer(max_epochs=cfg.epochs, logger=CSVLogger(out_path.parent, name=f"{out_path.name}_logs"),
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        **options)
    trainer.fit(module, train, val)
    (metrics,) = trainer.validate(module, val, verbose=False)
    weights = save_body(body.cpu(), out_path, cfg.model, model_kwargs)
    for written in (weights, weights.with_suffix(".json")):  # what cached_source_body_path verifies
        write_digest(written)
    return PretrainResult(weights, float(metrics["val_acc"]), chance, time.perf_counter() - start)


def source_body_path(cfg: PretrainConfig, data_root: str | Path, seed: int) -> Path:
    """`<data_root>/source/offline_<hash>`: one file stem per (cfg, seed)."""
    text = json.dumps({"config": asdict(cfg), "seed": seed}, sort_keys=True, default=str)
    return Path(data_root) / "source" / f"offline_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cached_source_body_path(cfg: PretrainConfig, data_root: str | Path, seed: int,
                            trainer_options: Mapping[str, Any] | None = None) -> tuple[Path, PretrainResult | None]:
    """The offline body's .safetensors file, pretrained first when missing or damaged (then with its
    PretrainResult); both files are checked against their content hashes."""
    stem = source_body_path(cfg, data_root, seed)
    weights, sidecar = stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")
    if all([cache_is_valid(weights), cache_is_valid(sidecar)]):  # a list: check (and clear) both
        return weights, None
    result = pretrain_source(cfg, stem, seed, trainer_options)
    return result.path, result


def cached_source_body(cfg: PretrainConfig, data_root: str | Path, seed: int,
                       trainer_options: Mapping[str, Any] | None = None) -> nn.Module:
    """The offline body, built once under `<data_root>/source/` and loaded from there afterwards."""
    path, _ = cached_source_body_path(cfg, data_root, seed, trainer_options)
    body, _ = load_body(path)
    return body
