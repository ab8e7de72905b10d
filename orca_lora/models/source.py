"""The source side: the pretrained body g_s and the source proxy data its features come from."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from orca_lora.config import SourceConfig
from orca_lora.data import procedural, vision
from orca_lora.models.body import build_body, load_body
from orca_lora.models.pretrain import cached_source_body_path

log = logging.getLogger("orca_lora")

def load_source_body(source: SourceConfig, data_root: str | Path) -> nn.Module:
    """The frozen source body: the offline procedural Swin (built once, cached) or any timm Swin."""
    if source.model == "offline":
        path, built = cached_source_body_path(source.pretrain, data_root, source.pretrain.seed)
        if built is not None:
            log.info("offline source body built: held-out accuracy %.3f (chance %.3f) in %.0f s -> %s",
                     built.val_accuracy, built.chance_accuracy, built.seconds, path)
        body, _ = load_body(path)
    else:
        # weights that come from neither the hub nor a checkpoint are timm's random init: seed it so
        # that a run (and every DDP process) rebuilds the same body from the config alone
        with torch.random.fork_rng():
            torch.manual_seed(source.pretrain.seed)
            body = build_body(source.model, pretrained=source.pretrained, checkpoint=source.checkpoint,
                              model_kwargs=dict(source.model_kwargs))
    return body.eval().requires_grad_(False)


def source_proxy(source: SourceConfig, data_root: str | Path) -> tuple[Tensor, Tensor]:
    """Labelled source-modality images (N, 3, H, W) and labels (N,) for alignment and gaps."""
    if source.proxy == "cifar10":
        dataset = vision.load_cifar("cifar10", Path(data_root) / "cifar", train=True,
                                    fetch_hint="fetch it once by running a config with `task.name: cifar10` and "
                                    "`task.download: true` (the source proxy itself never downloads)")
        count = min(source.proxy_samples, len(dataset))
        images, labels = zip(*(dataset[i] for i in range(count)))
        return torch.stack(images), torch.as_tensor(labels)
    pretrain = source.pretrain
    # the same classes as pretraining (the seed picks the systems), new images of each
    proxy = procedural.generate_procedural(pretrain.n_classes, procedural.proxy_images_per_class(source),
                                           image_size=pretrain.img_size, seed=pretrain.seed,
                                           sample_offset=pretrain.samples_per_class)
    return (torch.as_tensor(proxy.images)[: source.proxy_samples],
            torch.as_tensor(proxy.labels)[: source.proxy_samples])
