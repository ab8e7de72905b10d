"""Source and target samples and tokens shared by stage 1 (alignment) and stage 2 (gap).

Source side: proxy images through the pretrained body's own patch embedding (ORCA's f_s). Target
side: task inputs with labels, true classes or, for regression targets, k-means clusters of the
outputs (ORCA's pseudo-labels; Shen et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.align.pseudo_labels import kmeans_labels
from orca_lora.data.tasks import TaskData
from orca_lora.models.embedder import mean_pool


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


def labelled_target_sample(task: TaskData, max_samples: int, n_pseudo_labels: int,
                           seed: int) -> tuple[Tensor, Tensor]:
    """A seeded sample of the task's training inputs with labels: true classes, or k-means clusters
    of the outputs for regression."""
    count = min(max_samples, len(task.train))
    chosen = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))[:count]
    inputs, targets = zip(*(task.train[int(i)] for i in chosen))
    inputs, targets = torch.stack(inputs), torch.stack([torch.as_tensor(t) for t in targets])
    if task.regression:
        targets = kmeans_labels(targets.flatten(1).float(), min(n_pseudo_labels, count), seed=seed)
    return inputs, targets.long()


@dataclass(frozen=True)
class HeldOutSplit:
    """Indices of one sample set: the part stage 1 aligns on and the part stage 2 measures the gap on."""

    align: Tensor
    gap: Tensor


def held_out_split(n: int, n_gap: int, seed: int, what: str) -> HeldOutSplit:
    """`n_gap` of `n` samples held out for stage 2, drawn with a data seed (never the training seed),
    so every training seed measures its gap on the same samples and aligns on the rest."""
    if n - n_gap < 2:
        raise ValueError(f"{what} has {n} samples: holding out stage2.max_samples={n_gap} for the gap leaves "
                         f"{n - n_gap} for stage 1 (at least 2 needed); lower stage2.max_samples or use more data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return HeldOutSplit(order[n_gap:].sort().values, order[:n_gap].sort().values)
