"""A sweep's figures, from its finished runs: error against rank beside the seeds' published tables, gaps and gap-aware ranks per block, stage 1's alignment per task."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from orca_lora.choices import GAP_AWARE_ALLOCATIONS
from orca_lora.reports.figures import color_cycle, integer_rank_axis, log2_rank_axis, save_figure, subplots
from orca_lora.run_files import RunFiles, read_alignment, read_csv
from orca_lora.studies.seed_table import RunRecord, read_runs, summarize

SEED_TABLES = Path(__file__).with_name("seed_tables.csv")  # copy of the seeds' published sweep tables


SEED_TASKS = {"darcy": "Darcy-flow", "cifar100": "CIFAR100"}  # our task name -> the tables' name


def _published_panel(axis, rows: list[dict[str, str]]) -> None:
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    first_table = min(row["table"] for row in rows)
    for row in rows:
        label = f"table {row['table']}: {row['method']}"
        if row["rank"]:
            curves[label + f" (embedder training: {row['embedder_training'] or 'n/a'})"].append(
                (int(row["rank"]), float(row["prediction_error"])))
        elif row["table"] == first_table:
            axis.axhline(float(row["prediction_error"]), linestyle=":", alpha=0.8,
                         color="black" if row["method"] == "ORCA" else "gray",
                         label=f"{label}, all {row['trainable_params_M']}M params")
    for label, points in curves.items():
        axis.plot(*zip(*sorted(points)), marker="o", label=label)
    log2_rank_axis(axis)
    axis.set_xlabel("LoRA rank r (log scale)")
    axis.set_ylabel("prediction error (relative L2)")
    axis.set_title(f"published: {rows[0]['task']}, {rows[0]['source']} Swin-base")
    axis.legend(fontsize=7)


def plot_error_vs_rank(records: Sequence[RunRecord], stem: Path, reference: Path = SEED_TABLES) -> list[Path]:
    """Test error against rank per task (rows) and method, with the seeds' published curve beside it."""
    rows = summarize(records)
    tasks = sorted({row.task for row in rows})
    published = read_csv(reference) if reference.is_file() else []
    figure, axes = subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    colors = dict(zip(sorted({row.method for row in rows}), color_cycle()))
    for (ours, theirs), task in zip(axes, tasks):
        for (method, allocation) in sorted({(r.method, r.allocation) for r in rows if r.task == task}):
            chosen = [r for r in rows if r.task == task and r.method == method and r.allocation == allocation]
            if allocation == "-":
                ours.axhline(chosen[0].error_mean, linestyle="-.", color=colors[method], label=f"{method} fine-tuning")
                continue
            label = f"{method}, one rank" if allocation == "uniform" else f"{method}, gap-aware ranks at equal params"
            ours.errorbar([r.rank for r in chosen], [r.error_mean for r in chosen],
                          yerr=[0 if np.isnan(r.error_std) else r.error_std for r in chosen],
                          marker="o" if allocation == "uniform" else "*", markersize=6 if allocation == "uniform" else 11,
                          color=colors[method], markeredgecolor="black" if allocation != "uniform" else None,
                          linestyle="-" if allocation == "uniform" else "none", capsize=3, label=label)
        # the trivial predictor's error is named, not drawn: a line far above would flatten the curves
        baseline = next(record.baseline_error for record in records if record.task == task)
        log2_rank_axis(ours)
        ours.set_xlabel("LoRA rank r (log scale; gap-aware: the uniform rank matched)")
        ours.set_ylabel("test error (task metric)")
        ours.set_title(f"this sweep: {task} (trivial predictor: {baseline:.3g})")
        ours.legend(fontsize=7)
        matching = [row for row in published if row["task"] == SEED_TASKS.get(task.split("(")[0])]
        if matching:
            _published_panel(theirs, matching)
        else:
            theirs.axis("off")
            theirs.text(0.5, 0.5, f"no published table for {task}", ha="center", va="center")
    figure.suptitle("Error against LoRA rank")
    figure.tight_layout()
    return save_figure(figure, stem)


def plot_gaps_by_block(records: Sequence[RunRecord], stem: Path) -> list[Path]:
    """Stage 2's gap per block for each task, and the gap-aware ranks it chose."""
    figure, (gap_axis, rank_axis) = subplots(1, 2, figsize=(11, 3.8))
    for task in sorted({record.task for record in records}):
        measured = [record for record in records if record.task == task and record.gaps is not None]
        if not measured:
            continue
        gaps = np.mean([record.gaps for record in measured], axis=0)
        gap_axis.plot(range(len(gaps)), gaps, marker="o", label=task)
        for record in measured:
            if record.allocation in GAP_AWARE_ALLOCATIONS and record.seed == measured[0].seed:
                rank_axis.plot(range(len(record.block_ranks)), record.block_ranks, marker="o",
                               label=f"{task}, matched to r={record.rank}")
    gap_axis.set_xlabel("Swin block (forward order)")
    gap_axis.set_ylabel("floor-corrected gap D_i (source-anchored units)")
    gap_axis.set_title("Stage 2: gap per block")
    rank_axis.set_xlabel("Swin block (forward order)")
    rank_axis.set_ylabel("LoRA rank r_i")
    rank_axis.set_title("gap-aware ranks per block")
    integer_rank_axis(rank_axis, [rank for record in records if record.block_ranks for rank in record.block_ranks])
    for axis in (gap_axis, rank_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, stem)


def plot_alignment_curves(records: Sequence[RunRecord], stem: Path) -> list[Path]:
    """Stage 1's distance per epoch, one curve per task (its first run; runs of one seed share stage 1)."""
    figure, axis = subplots(figsize=(6, 4))
    distance = None
    for task in sorted({record.task for record in records}):
        run = RunFiles(next(r.directory for r in records if r.task == task))
        if not run.alignment.is_file():
            continue
        distance, curve = read_alignment(run)
        axis.plot(range(len(curve)), curve, marker=".", label=task)
    axis.set_xlabel("epoch (0 = before training)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(f"{distance or 'distance'} to source features (log scale)")
    axis.set_yscale("log")
    axis.set_title("Stage 1: embedder alignment per task")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    return save_figure(figure, stem)


def plot_sweep(directory: Path) -> list[Path]:
    """The sweep figures under `directory/plots/`, from the finished runs below `directory` (a study's
    r* against the gap is drawn by `orca-lora report`, which chooses r* on validation)."""
    records = read_runs([directory])
    out = directory / "plots"
    written = plot_error_vs_rank(records, out / "error_vs_rank")
    written += plot_gaps_by_block(records, out / "gaps_by_block")
    written += plot_alignment_curves(records, out / "alignment")
    return written
