"""Toy tasks and by-hand references shared by several test modules (tests/ is on sys.path, see conftest)."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from orca_lora.data.tasks import TaskData, cross_entropy, misclassification


def make_task(inputs: torch.Tensor, targets: torch.Tensor, regression: bool) -> TaskData:
    train = TensorDataset(inputs, targets)
    return TaskData(
        name="toy", train=train, val=train, test=train, in_channels=inputs.shape[1],
        input_size=tuple(inputs.shape[-2:]), head="dense" if regression else "classification",
        num_outputs=1 if regression else int(targets.max()) + 1,
        output_size=tuple(targets.shape[-2:]) if regression else None, error=misclassification,
        loss=cross_entropy, output_transform=nn.Identity(), baseline_error=0.5,
    )


def indexed_classification_task(n: int = 40, classes: int = 3) -> TaskData:
    """Sample i is an image filled with i, labelled i % classes, so a returned pair names its index."""
    inputs = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 16, 16).clone()
    return make_task(inputs, torch.arange(n) % classes, regression=False)


def by_hand_patch_embedding(body: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Bilinear resize, conv with kernel = stride = patch, LayerNorm over channels, mean over tokens."""
    embed = body.patch_embed
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    tokens = F.conv2d(resized, embed.proj.weight, embed.proj.bias, stride=embed.proj.stride).permute(0, 2, 3, 1)
    tokens = F.layer_norm(tokens, tokens.shape[-1:], embed.norm.weight, embed.norm.bias, embed.norm.eps)
    return tokens.mean(dim=(1, 2))


def clustered_regression_task(per_cluster: int = 10) -> tuple[TaskData, torch.Tensor]:
    """Target fields around three far-apart levels; returns the task and each sample's true cluster."""
    generator = torch.Generator().manual_seed(3)
    clusters = torch.arange(3).repeat_interleave(per_cluster)
    fields = 10.0 * clusters[:, None, None].float() + 0.1 * torch.randn(len(clusters), 8, 8, generator=generator)
    inputs = torch.randn(len(clusters), 1, 8, 8, generator=generator)
    inputs[:, 0, 0, 0] = torch.arange(len(clusters), dtype=torch.float32)  # names the sample
    return make_task(inputs, fields, regression=True), clusters
