"""Figures from saved run files (PNG and PDF), never from stage internals."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator
from omegaconf import OmegaConf

from orca_lora.choices import GAP_AWARE_ALLOCATIONS
from orca_lora.experiments.tables import RunRecord, find_runs, read_runs, summarize
from orca_lora.files import save_figure_atomic
from orca_lora.run_files import GapRow, RunFiles, read_alignment, read_gaps, read_metrics, read_training_log

SEED_TABLES = Path(__file__).with_name("seed_tables.csv")  # copy of the seeds' published sweep tables
SEED_TASKS = {"darcy": "Darcy-flow", "cifar100": "CIFAR100"}  # our task name -> the tables' name


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def subplots(rows: int = 1, columns: int = 1, **options: Any) -> tuple[Figure, Any]:
    """A figure and its axes, made without pyplot, so no backend is chosen or changed (a notebook
    keeps its own); `options` go to `Figure` (figsize) and `Figure.subplots` (squeeze)."""
    squeeze = options.pop("squeeze", True)
    figure = Figure(**options)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def save_figure(figure: Figure, stem: Path) -> list[Path]:
    """Write `stem.png` and `stem.pdf`, each through a temp file, so no half-written figure is left."""
    written = []
    for suffix in ("png", "pdf"):
        path = stem.with_suffix(f".{suffix}")
        save_figure_atomic(figure, path, dpi=150, bbox_inches="tight")
        written.append(path)
    return written


def color_cycle() -> list[str]:
    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


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
    rank_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    gap_axis.set_title("Stage 2: gap and rank per block")
    handles = gap_axis.get_legend_handles_labels()[0] + rank_axis.get_legend_handles_labels()[0]
    gap_axis.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=7)
    return save_figure(figure, stem)


def block_median_ranks(rows: Sequence[GapRow], ranks: dict[str, int]) -> list[float | None]:
    """Per block (as `rows`), the median rank (posterior or allocated) over the block's adapted modules;
    None for a block with none. A module belongs to the block whose dotted name it contains (`.layers.0.blocks.1.`)."""
    medians: list[float | None] = []
    for row in rows:
        block = [rank for module, rank in ranks.items() if f".{row.name}." in f".{module}."]
        medians.append(float(np.median(block)) if block else None)
    return medians


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
    rank_axis.set_ylim(bottom=0)
    rank_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    gap_axis.set_title("Stage 3 (ibp-lora): posterior rank and gap per block")
    handles = gap_axis.get_legend_handles_labels()[0] + rank_axis.get_legend_handles_labels()[0]
    gap_axis.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=7)
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


def _rank_axis(axis) -> None:
    """Log-2 rank axis labelled 1, 2, 4, ... rather than 2^0, 2^1, ..."""
    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_locator(NullLocator())


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
    _rank_axis(axis)
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
        _rank_axis(ours)
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
    rank_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
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
    records = read_runs(find_runs([directory]))
    out = directory / "plots"
    written = plot_error_vs_rank(records, out / "error_vs_rank")
    written += plot_gaps_by_block(records, out / "gaps_by_block")
    written += plot_alignment_curves(records, out / "alignment")
    return written
