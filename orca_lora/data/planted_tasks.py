"""Known-answer controls (README, "Known-answer controls"): tasks whose needed LoRA rank is planted.

`planted-shift`: fresh images of the source's own pretraining classes, every patch vector mapped by
the fixed T of `planted.py` (a gap of dimension `task.planted_k` at the body's entry, rotated by
`task.planted_angle`, its directions drawn from `task.planted_planes`, by default `task.data_seed`). The
target is the frozen source body's mean-pooled features of the clean image (regression, relative L2), so
with LoRA on the embedding projection the needed rank is exactly k (Zeng & Lee 2024, Lemma 1): rank k
makes the error zero, no lower rank can.

`planted-function`: the same fresh images, unchanged (every block's gap at its floor); the target is a
teacher's pooled features, the frozen body with one Linear (`task.planted_module`) changed by a rank-k
dW whose k directions, on the module's most-used inputs, act equally (`planted.function_update`). With
LoRA on that module alone the needed rank is exactly k while the gap does not move.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orca_lora.config import TaskConfig
from orca_lora.data import darcy, planted, procedural
from orca_lora.data.tasks import SourceSide, TaskData, register_source_task, split_train_val
from orca_lora.models.embedder import mean_pool

_FEATURE_BATCH = 256


def source_class_images(source: SourceSide, count: int, seed: int) -> Tensor:
    """`count` images (N, 3, H, W) of the source's pretraining classes, class-balanced and shuffled by
    `seed`, drawn after the images pretraining and the source proxy used (so fresh to both)."""
    pretrain = source.config.pretrain
    per_class = math.ceil(count / pretrain.n_classes)
    used = pretrain.samples_per_class + procedural.proxy_images_per_class(source.config)
    images = procedural.generate_procedural(pretrain.n_classes, per_class, image_size=pretrain.img_size,
                                            seed=pretrain.seed, sample_offset=used).images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.as_tensor(images)[order]


@torch.no_grad()
def pooled_source_features(body: nn.Module, images: Tensor) -> Tensor:
    """(N, C) mean-pooled normed last-stage tokens of the frozen body, as the `pooled` head reads them."""
    return torch.cat([mean_pool(body.forward_features(batch)) for batch in images.split(_FEATURE_BATCH)])


def pooled_regression_task(name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                           config: TaskConfig) -> TaskData:
    """Inputs to pooled-feature vectors, relative L2; the trivial predictor is the mean training vector."""
    train, val = split_train_val(TensorDataset(x_train, y_train), config.val_fraction, config.data_seed)
    mean_vector = y_train.mean(dim=0, keepdim=True).expand_as(y_test)
    return TaskData(
        name=name, train=train, val=val, test=TensorDataset(x_test, y_test), in_channels=x_train.shape[1],
        input_size=tuple(x_train.shape[-2:]), head="pooled", num_outputs=y_train.shape[1], output_size=None,
        error=darcy.relative_l2, loss=darcy.relative_l2, output_transform=nn.Identity(),
        baseline_error=float(darcy.relative_l2(mean_vector, y_test).mean()),
    )


def planes_seed(config: TaskConfig) -> int:
    """The seed of a plant's directions: `task.planted_planes`, or `task.data_seed` when it is null."""
    return config.data_seed if config.planted_planes is None else config.planted_planes


def _planes_generator(config: TaskConfig) -> torch.Generator:
    return torch.Generator().manual_seed(planes_seed(config))


def planted_patch_map(body: nn.Module, config: TaskConfig) -> Tensor:
    """T (C p^2 x C p^2, float64) for the body's patch embedding: `task.planted_k` directions drawn from
    `task.planted_planes` (null: `task.data_seed`), rotated by `task.planted_angle`."""
    projection = body.patch_embed.proj
    weight, bias = projection.weight.detach(), projection.bias.detach()
    directions = planted.plant_directions(weight, bias, config.planted_k, _planes_generator(config))
    return planted.planted_transform(weight, planted.token_rotation(directions, config.planted_angle))


@register_source_task("planted-shift")
def planted_shift_task(config: TaskConfig, data_root: Path, source: SourceSide) -> TaskData:
    """Source-class images with a planted rank-k patch map; targets: the body's pooled clean features."""
    img_size = source.config.pretrain.img_size
    if config.resolution != img_size:
        raise ValueError(f"task.resolution: planted-shift plants its map on the body's own patches; set it to the "
                         f"body's img_size {img_size} (got {config.resolution})")
    body = source.body
    transform = planted_patch_map(body, config)
    clean = source_class_images(source, config.n_train + config.n_test, config.data_seed)
    shifted = planted.map_patches(clean.double(), transform, int(body.patch_embed.patch_size[0])).float()
    targets = pooled_source_features(body, clean)
    n_test = config.n_test
    return pooled_regression_task("planted-shift", shifted[n_test:], targets[n_test:], shifted[:n_test],
                                  targets[:n_test], config)


def _planted_linear(body: nn.Module, name: str) -> nn.Linear:
    try:
        module = body.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        linears = [n for n, m in body.named_modules() if isinstance(m, nn.Linear) and ".blocks." in n]
        raise ValueError(f"task.planted_module: {name!r} is not a Linear of the body; one of "
                         f"{', '.join(linears[:4])}, ...")
    return module


@torch.no_grad()
def input_moment(body: nn.Module, module: nn.Module, images: Tensor) -> Tensor:
    """E[x x^T] (float64) of `module`'s inputs over every token of the body's forward pass on `images`."""
    total, count = None, 0

    def catch(_module: nn.Module, args: tuple) -> None:
        nonlocal total, count
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        total = x.T @ x if total is None else total + x.T @ x
        count += len(x)

    handle = module.register_forward_pre_hook(catch)
    try:
        for batch in images.split(_FEATURE_BATCH):
            body.forward_features(batch)
    finally:
        handle.remove()
    return total / count


def planted_module_update(body: nn.Module, config: TaskConfig, images: Tensor) -> Tensor:
    """dW (float64) of `task.planted_module`: rank `task.planted_k`, its k directions of equal effect on the
    module's inputs over `images` (`planted.function_update`), `task.planted_scale`, drawn from
    `task.planted_planes` (null: `task.data_seed`)."""
    module = _planted_linear(body, config.planted_module)
    return planted.function_update(module.weight.detach(), input_moment(body, module, images), config.planted_k,
                                   config.planted_scale, _planes_generator(config))


def planted_teacher(body: nn.Module, config: TaskConfig, images: Tensor) -> nn.Module:
    """A copy of the frozen body with `planted_module_update` added to its planted module's weight."""
    teacher = copy.deepcopy(body)
    module = teacher.get_submodule(config.planted_module)
    with torch.no_grad():
        module.weight += planted_module_update(body, config, images).to(module.weight.dtype)
    return teacher


@register_source_task("planted-function")
def planted_function_task(config: TaskConfig, data_root: Path, source: SourceSide) -> TaskData:
    """Clean source-class images; targets: the pooled features of the body with a planted rank-k module change."""
    images = source_class_images(source, config.n_train + config.n_test, config.data_seed)
    teacher = planted_teacher(source.body, config, images[config.n_test:])  # the plant sees training images only
    targets = pooled_source_features(teacher, images)
    n_test = config.n_test
    return pooled_regression_task("planted-function", images[n_test:], targets[n_test:], images[:n_test],
                                  targets[:n_test], config)
