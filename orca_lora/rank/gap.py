"""Per-block modality gap D_i of the frozen body (DESIGN 6).

Source tokens (source proxy through the body's own patch embedding) and target tokens (target
data through the trained embedder) go through the body once, with forward pre-hooks catching
every Swin block's input. Each block's inputs are mean-pooled over tokens, standardised with the
pooled statistics of both sets (so a shift or scale difference stays visible, while features on
large scales do not dominate), and compared with a registered distance.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from orca_lora.align.distances import DISTANCES
from orca_lora.models.body import body_blocks


def pooled_block_inputs(body: nn.Module, tokens: Tensor, batch_size: int = 64) -> list[Tensor]:
    """Mean-pooled NHWC input of every Swin block, in forward order: one (N, C_i) tensor per block."""
    blocks = [block for _, block in body_blocks(body)]
    pooled: list[list[Tensor]] = [[] for _ in blocks]

    def catch(index: int, module: nn.Module, args: tuple) -> None:
        pooled[index].append(args[0].mean(dim=(1, 2)))

    handles = [block.register_forward_pre_hook(partial(catch, i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in tokens.split(batch_size):
                body.layers(batch)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in pooled]


def standardize_jointly(source: Tensor, target: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """z-score both sets with the mean and std of their union, per feature."""
    union = torch.cat([source, target])
    mean, std = union.mean(dim=0), union.std(dim=0) + eps
    return (source - mean) / std, (target - mean) / std


def block_gaps(body: nn.Module, source_tokens: Tensor, target_tokens: Tensor, distance: str,
               source_labels: Tensor | None = None, target_labels: Tensor | None = None,
               batch_size: int = 64, **options) -> list[float]:
    """D_i for every block i of `body`, measured with the registered `distance` (mmd, otdd, c2st)."""
    if distance not in DISTANCES:
        raise KeyError(f"stage2.distance: {distance!r} is not one of {', '.join(sorted(DISTANCES))}")
    if source_tokens.shape[1:] != target_tokens.shape[1:]:
        raise ValueError(f"source tokens {tuple(source_tokens.shape[1:])} and target tokens "
                         f"{tuple(target_tokens.shape[1:])} must share the body's token grid (H, W, C)")
    if source_labels is None:
        source_labels = torch.zeros(len(source_tokens), dtype=torch.long)
    if target_labels is None:
        target_labels = torch.zeros(len(target_tokens), dtype=torch.long)
    measure = DISTANCES[distance].fn
    source_blocks = pooled_block_inputs(body, source_tokens, batch_size)
    target_blocks = pooled_block_inputs(body, target_tokens, batch_size)
    gaps = []
    for source, target in zip(source_blocks, target_blocks):
        source, target = standardize_jointly(source.double(), target.double())
        with torch.no_grad():
            gaps.append(float(measure(source, source_labels, target, target_labels, **options)))
    return gaps
