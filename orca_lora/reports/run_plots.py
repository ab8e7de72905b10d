"""One run's figures, from its run files: stage 1's alignment curve, stage 2's gaps and ranks per block, stage 3's training curves, IBP-LoRA's posterior ranks."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from orca_lora.records import GapRow
from orca_lora.reports.figures import integer_rank_axis, legend_below, save_figure, subplots
from orca_lora.run_files import RunFiles, module_block, read_alignment, read_gaps, read_metrics, read_training_log


def plot_alignment(distance: str, curve: Sequence[float], stem: Path) -> list[Path]:
    figure, axis = subplots(figsize=(5, 3.5))
    axis.plot(range(len(curve)), curve, marker="o", label=distance)
    axis.set_xlabel("epoch (0 = before training)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(f"{distance} to source features (squared feature units)")
    axis.set_title("Stage 1: embedder alignment")
    axis.legend()
    return save_figure(figure, stem)


GAP_UNITS = {"spectral": "directions of the shift (spectral rank)", "c2st": "2 |accuracy - 1/2| (c2st)"}


def gap_label(distance: str) -> str:
    """The gap axis's label: what stage2.distance measures it in."""
    return f"modality gap D_i, {GAP_UNITS.get(distance, f'{distance}, source-anchored units')}"


def plot_gaps_and_ranks(rows: Sequence[GapRow], stem: Path, distance: str = "mmd") -> list[Path]:
    """Each block's gap with its 95% interval against its noise floor, and the rank it got."""
    blocks = [row.block for row in rows]
    figure, gap_axis = subplots(figsize=(6.5, 3.8))
    gap_axis.bar(blocks, [row.gap for row in rows], color="tab:blue", alpha=0.7, label="gap D_i (95% interval)",
                 # a bootstrap interval need not contain the estimate (a biased or discrete statistic)
                 yerr=[[max(row.gap - row.ci_low, 0) for row in rows], [max(row.ci_high - row.gap, 0) for row in rows]],
                 capsize=3)
    gap_axis.fill_between(blocks, 0, [row.floor for row in rows], step="mid", color="gray", alpha=0.3,
                          label="noise floor (null 95% quantile)")
    for row in rows:
        if row.corrected == 0:
            gap_axis.annotate("at floor", (row.block, max(row.ci_high, row.floor)), textcoords="offset points",
                              xytext=(0, 3), ha="center", fontsize=7)
    gap_axis.set_xlabel("Swin block (forward order; width " + ", ".join(str(row.width) for row in rows) + ")")
    gap_axis.set_ylabel(gap_label(distance))
    gap_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    rank_axis = gap_axis.twinx()
    rank_axis.plot(blocks, [row.rank for row in rows], color="tab:red", marker="o", label="LoRA rank r_i")
    rank_axis.set_ylabel("LoRA rank r_i")
    integer_rank_axis(rank_axis, [row.rank for row in rows])
    gap_axis.set_title("Stage 2: gap and rank per block")
    legend_below(gap_axis, rank_axis)
    return save_figure(figure, stem)


def block_median_ranks(rows: Sequence[GapRow], ranks: dict[str, int]) -> list[float | None]:
    """Per block (as `rows`), the median rank (posterior or allocated) over the block's adapted modules;
    None for a block with none (`run_files.module_block` says which block holds a module)."""
    names = [row.name for row in rows]
    per_block: list[list[int]] = [[] for _ in rows]
    for module, rank in ranks.items():
        index = module_block(module, names)
        if index is not None:
            per_block[index].append(rank)
    return [float(np.median(block)) if block else None for block in per_block]


def plot_posterior_ranks(rows: Sequence[GapRow], posterior: dict[str, int], caps: dict[str, int],
                         stem: Path, distance: str = "mmd") -> list[Path]:
    """ibp-lora's posterior rank per block (median over its modules, with the median truncation r_max)
    beside the block's gap: does the rank the data ask for follow the gap?"""
    blocks = [row.block for row in rows]
    figure, gap_axis = subplots(figsize=(6.5, 3.8))
    gap_axis.bar(blocks, [row.gap for row in rows], color="tab:blue", alpha=0.7, label="gap D_i")
    gap_axis.set_xlabel("Swin block (forward order)")
    gap_axis.set_ylabel(gap_label(distance))
    gap_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    rank_axis = gap_axis.twinx()
    for values, style, label in ((posterior, dict(color="tab:red", marker="o"), "posterior rank (median of modules)"),
                                 (caps, dict(color="gray", linestyle="--"), "truncation r_max (median)")):
        medians = block_median_ranks(rows, values)
        shown = [(block, value) for block, value in zip(blocks, medians) if value is not None]
        if shown:
            rank_axis.plot(*zip(*shown), label=label, **style)
    rank_axis.set_ylabel("rank (components with q(z = 1) > 0.5)")
    integer_rank_axis(rank_axis, [*posterior.values(), *caps.values()])
    gap_axis.set_title("Stage 3 (ibp-lora): posterior rank and gap per block")
    legend_below(gap_axis, rank_axis)
    return save_figure(figure, stem)


def plot_training(rows: Sequence[dict[str, str]], stem: Path, baseline_error: float | None = None) -> list[Path]:
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    val = [(int(r["step"]), float(r["val_error"])) for r in rows if r.get("val_error")]
    figure, axis = subplots(figsize=(5, 3.5))
    if train:
        axis.plot(*zip(*train), label="training loss", alpha=0.7)
    if val:
        axis.plot(*zip(*val), marker="o", label="validation error")
    if baseline_error is not None:
        axis.axhline(baseline_error, color="gray", linestyle="--", label="trivial predictor (test)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss / error (task unit)")
    axis.set_yscale("log")
    axis.set_title("Stage 3: fine-tuning")
    axis.legend()
    return save_figure(figure, stem)


def plot_run(run_dir: Path) -> list[Path]:
    """Every figure a run directory has the files for, under `run_dir/plots/`."""
    run = RunFiles(run_dir)
    written = []
    if run.alignment.is_file():
        written += plot_alignment(*read_alignment(run), run.plots / "alignment")
    gaps = read_gaps(run)
    if gaps:
        distance = OmegaConf.load(run.config).stage2.distance if run.config.is_file() else "mmd"
        written += plot_gaps_and_ranks(gaps, run.plots / "gaps_and_ranks", distance)
    training = read_training_log(run)
    metrics = read_metrics(run) if run.is_finished() else None
    if training:
        baseline = metrics.baseline_error if metrics is not None else None
        written += plot_training(training, run.plots / "training", baseline)
    if gaps and metrics is not None and metrics.posterior_ranks:
        written += plot_posterior_ranks(gaps, metrics.posterior_ranks, metrics.posterior_caps or {},
                                        run.plots / "posterior_ranks", distance)
    return written
