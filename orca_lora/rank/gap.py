"""Per-block modality gap D_i of the frozen body, in units anchored to the source (README, "The gap").

Source tokens (held-out source proxy images through the body's own patch embedding) and target
tokens (held-out target data through the trained embedder) go through the body once, with forward
pre-hooks catching every Swin block's input, mean-pooled over tokens. Each block's features are
standardised with the source sample's own mean and std (`SourceUnits`), and the MMD bandwidths
are fixed from source-source distances, so the units of D_i depend on the body and the source
proxy set only: any two tasks' D_i at block i are comparable. Each distance is measured against
its own null (`rank/null.py`): the floor, p-value and interval come with every gap.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from orca_lora.align.distances import DISTANCES, median_bandwidths
from orca_lora.models.body import body_blocks
from orca_lora.rank.null import GapEstimate, c2st_test, mmd_gap, otdd_gap, resampled_gap, spectral_gap
from orca_lora.rank.spectral import CalibrationStore

STD_EPS = 1e-6


class _LastInputCaught(Exception):
    pass


def pooled_block_inputs(body: nn.Module, tokens: Tensor, batch_size: int = 64) -> list[Tensor]:
    """Mean-pooled NHWC input of every Swin block, in forward order: one (N, C_i) tensor per block."""
    blocks = [block for _, block in body_blocks(body)]
    pooled: list[list[Tensor]] = [[] for _ in blocks]

    def catch(index: int, module: nn.Module, args: tuple) -> None:
        pooled[index].append(args[0].mean(dim=(1, 2)))
        if index == len(blocks) - 1:
            raise _LastInputCaught  # the last block's own output is no block's input: skip computing it

    handles = [block.register_forward_pre_hook(partial(catch, i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in tokens.split(batch_size):
                try:
                    body.layers(batch)
                except _LastInputCaught:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in pooled]


@dataclass(frozen=True)
class SourceUnits:
    """One block's source-anchored units: the source features' mean and std, and the MMD
    bandwidths (median-heuristic multiples of the source-source median distance m0)."""

    mean: Tensor
    std: Tensor
    bandwidths: Tensor
    median_distance: float

    @property
    def width(self) -> int:
        return int(self.mean.numel())

    def standardize(self, features: Tensor) -> Tensor:
        return (features.double() - self.mean) / self.std


def source_units(source: Tensor) -> SourceUnits:
    """The units of one block from its (held-out) source features alone."""
    source = source.double()
    mean, std = source.mean(dim=0), source.std(dim=0) + STD_EPS
    z = (source - mean) / std
    bandwidths = median_bandwidths(z, z)
    return SourceUnits(mean, std, bandwidths, float(bandwidths[len(bandwidths) // 2]))


@dataclass(frozen=True)
class GapSettings:
    """How a block's gap and its null are estimated."""

    distance: str = "mmd"
    permutations: int = 200  # null draws for mmd and the permutation-based distances
    bootstraps: int = 200  # interval draws
    otdd_draws: int = 20  # subsample draws for otdd (each two OT solves)
    seed: int = 0  # draws of the null and the interval
    options: dict | None = None  # the distance's own options (otdd: inner, entropic_reg, ...)
    calibrations: CalibrationStore | None = None  # spectral: stored null simulations (data-free)


Estimator = Callable[[Tensor, Tensor, Tensor, Tensor, SourceUnits, GapSettings, torch.Generator, dict],
                     GapEstimate]
# distances with an estimator of their own (rank/null.py); any other registered distance gets the
# generic permutation null and bootstrap of `resampled_gap`
ESTIMATORS: dict[str, Estimator] = {
    "mmd": lambda z_s, y_s, z_t, y_t, units, settings, generator, options: mmd_gap(
        z_s, z_t, units.bandwidths, units.median_distance ** 2, generator, settings.permutations, settings.bootstraps),
    "otdd": lambda z_s, y_s, z_t, y_t, units, settings, generator, options: otdd_gap(
        z_s, y_s, z_t, y_t, generator, settings.otdd_draws, **options),
    "c2st": lambda z_s, y_s, z_t, y_t, units, settings, generator, options: c2st_test(z_s, z_t, **options),
    "spectral": lambda z_s, y_s, z_t, y_t, units, settings, generator, options: spectral_gap(
        z_s, z_t, generator, settings.permutations, settings.bootstraps, store=settings.calibrations, **options),
}


def _resampled(z_s: Tensor, y_s: Tensor, z_t: Tensor, y_t: Tensor, units: SourceUnits, settings: GapSettings,
               generator: torch.Generator, options: dict) -> GapEstimate:
    distance = partial(DISTANCES[settings.distance].fn, **options)
    return resampled_gap(distance, z_s, y_s, z_t, y_t, generator, settings.permutations, settings.bootstraps)


def block_gap(source: Tensor, source_labels: Tensor, target: Tensor, target_labels: Tensor,
              units: SourceUnits, settings: GapSettings) -> GapEstimate:
    """D of one block with its floor, p-value and interval, both sets in the source's units."""
    estimate = ESTIMATORS.get(settings.distance, _resampled)
    with torch.no_grad():
        return estimate(units.standardize(source), source_labels, units.standardize(target), target_labels, units,
                        settings, torch.Generator().manual_seed(settings.seed), settings.options or {})


@dataclass(frozen=True)
class BlockGap:
    name: str
    width: int
    estimate: GapEstimate


def block_gaps(body: nn.Module, source_tokens: Tensor, target_tokens: Tensor, settings: GapSettings,
               source_labels: Tensor | None = None, target_labels: Tensor | None = None,
               batch_size: int = 64) -> list[BlockGap]:
    """The gap of every block of `body`, in forward order."""
    if settings.distance not in DISTANCES:
        raise KeyError(f"stage2.distance: {settings.distance!r} is not one of {', '.join(sorted(DISTANCES))}")
    if source_tokens.shape[1:] != target_tokens.shape[1:]:
        raise ValueError(f"source tokens {tuple(source_tokens.shape[1:])} and target tokens "
                         f"{tuple(target_tokens.shape[1:])} must share the body's token grid (H, W, C)")
    if source_labels is None:
        source_labels = torch.zeros(len(source_tokens), dtype=torch.long)
    if target_labels is None:
        target_labels = torch.zeros(len(target_tokens), dtype=torch.long)
    names = [name for name, _ in body_blocks(body)]
    source_blocks = pooled_block_inputs(body, source_tokens, batch_size)
    target_blocks = pooled_block_inputs(body, target_tokens, batch_size)
    gaps = []
    for name, source, target in zip(names, source_blocks, target_blocks):
        units = source_units(source)
        gaps.append(BlockGap(name, units.width, block_gap(source, source_labels, target, target_labels, units,
                                                          settings)))
    return gaps
