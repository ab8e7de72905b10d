"""Figures of an allocation comparison (PNG and PDF), from its result and the chosen runs' saved files."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from orca_lora.records import GapRow
from orca_lora.reports.figures import color_cycle, save_figure, subplots
from orca_lora.reports.run_plots import block_median_ranks
from orca_lora.run_files import RunFiles, read_effective_ranks, read_gaps
from orca_lora.studies.compare import CompareResult, Selection

MARKERS = "osD^vP*Xh<>"


def _styles(result: CompareResult) -> dict[str, dict]:
    """A colour and marker per allocation: the colour cycle repeats after ten, the pair does not."""
    allocations = list(dict.fromkeys(row.allocation for row in result.rows))
    cycle = color_cycle()
    return {allocation: {"color": cycle[index % len(cycle)], "marker": MARKERS[index % len(MARKERS)]}
            for index, allocation in enumerate(allocations)}




def plot_error_vs_budget(result: CompareResult, stem: Path) -> list[Path]:
    """Test error (mean +- SE over seeds, at the val-chosen lr) per allocation, per task: against the
    adapter parameters when the task has several budgets, side by side when it has one."""
    tasks = sorted({row.task for row in result.rows})
    figure, axes = subplots(1, len(tasks), figsize=(7.5 * len(tasks), 4), squeeze=False)
    styles = _styles(result)
    for axis, task in zip(axes[0], tasks):
        by_allocation = defaultdict(list)
        for row in result.rows:
            if row.task == task:
                by_allocation[row.allocation].append(row)
        budgets = {str(row.budget) for rows in by_allocation.values() for row in rows}
        for index, (allocation, rows) in enumerate(by_allocation.items()):
            rows.sort(key=lambda row: row.adapter_params)
            x = [index] if len(budgets) == 1 else [row.adapter_params for row in rows]
            axis.errorbar(x, [row.test_error for row in rows],
                          yerr=[0.0 if np.isnan(row.test_se) else row.test_se for row in rows], capsize=3,
                          label=allocation, linewidth=2.5 if allocation == "uniform" else 1.2, **styles[allocation])
        if len(budgets) == 1:
            axis.set_xticks(range(len(by_allocation)), list(by_allocation), rotation=45, ha="right")
            axis.set_title(f"{task}, {budgets.pop()}: allocations at equal budget")
        else:
            axis.set_xlabel("adapter parameters sum r_i (d_in + d_out)")
            axis.set_title(f"{task}: allocations at equal budgets")
            axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        axis.set_ylabel("test error (mean ± SE over seeds)")
    figure.tight_layout()
    return save_figure(figure, stem)


def _mean_block_ranks(selection: Selection, rows: list[GapRow]) -> list[float]:
    """Per block, the mean over seeds of the median rank of the block's modules (NaN: none adapted)."""
    per_seed = [block_median_ranks(rows, read_effective_ranks(RunFiles(run.directory)).ranks)
                for run in selection.runs]
    return [float(np.mean(values)) if all(v is not None for v in values) else np.nan for values in zip(*per_seed)]


def _gap_rows(selections: list[Selection]) -> list[GapRow] | None:
    """Stage 2's gaps.csv of the table's first run that has one (the gap does not depend on the allocation)."""
    for selection in selections:
        for run in selection.runs:
            rows = read_gaps(RunFiles(run.directory))
            if rows:
                return rows
    return None


def plot_allocation_ranks(result: CompareResult, stem: Path) -> list[Path]:
    """Per (task, budget): each allocation's ranks per block beside the block's floor-corrected gap."""
    tables = defaultdict(list)
    for selection in result.selections:
        tables[(selection.task, str(selection.budget))].append(selection)
    figure, axes = subplots(1, len(tables), figsize=(8.5 * len(tables), 4), squeeze=False)
    styles = _styles(result)
    for axis, ((task, budget), selections) in zip(axes[0], tables.items()):
        rows = _gap_rows(selections)
        if rows is None:
            axis.axis("off")
            axis.text(0.5, 0.5, f"{task}, {budget}: no run measured the gap", ha="center", va="center")
            continue
        blocks = [row.block for row in rows]
        axis.bar(blocks, [row.corrected for row in rows], color="lightgray", label="gap max(D_i - floor, 0)")
        axis.set_ylabel("floor-corrected gap (source-anchored units)")
        axis.set_xlabel("Swin block (forward order)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        rank_axis = axis.twinx()
        for selection in selections:
            rank_axis.plot(blocks, _mean_block_ranks(selection, rows), label=selection.allocation,
                           **styles[selection.allocation])
        rank_axis.set_ylabel("rank per block (median of modules, mean over seeds)")
        rank_axis.set_ylim(bottom=0)
        axis.set_title(f"{task}, {budget}: ranks per block and gap")
        handles = axis.get_legend_handles_labels()[0] + rank_axis.get_legend_handles_labels()[0]
        axis.legend(handles, [handle.get_label() for handle in handles], fontsize=7, loc="upper left",
                    bbox_to_anchor=(1.12, 1.0))
    figure.tight_layout()
    return save_figure(figure, stem)


def plot_compare(result: CompareResult, directory: Path) -> list[Path]:
    out = directory / "plots"
    return plot_error_vs_budget(result, out / "compare_error_vs_budget") + \
        plot_allocation_ranks(result, out / "compare_ranks")
