"""Figures of a study's analysis (PNG and PDF), drawn from a `hypothesis.StudyResult` alone, never from
run files (plan: configs/study_gap.md). Each function returns the files it wrote, [] when the result
has nothing for its figure."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from orca_lora.reports.figures import color_cycle, log2_rank_axis, save_figure, subplots
from orca_lora.studies.block_evidence import BlockPoint, BlockTrend
from orca_lora.studies.hypothesis import StudyResult
from orca_lora.studies.method_shares import MethodShare
from orca_lora.studies.rank_threshold import index_interval

Z95 = 1.96  # the bands and bars: +-1.96 SE
COLUMNS = 4  # panels per row of the rank-curve grid
REGIME_MARKERS = ("o", "s", "^", "D")


def task_order(result: StudyResult) -> list[str]:
    """The primary tasks by increasing gap, then any task only the secondary parts have."""
    ordered = [chosen.task for chosen in sorted(result.chosen, key=lambda chosen: chosen.gap)]
    ordered += sorted({row.task for row in result.rank_rows} - set(ordered))
    others = {item.task for part in (result.posterior, result.one_block, result.energy, result.shares,
                                     result.benefits) for item in part}
    return ordered + sorted(others - set(ordered))


def task_colors(result: StudyResult) -> dict[str, str]:
    """One colour per task, the same in every figure."""
    colors = color_cycle()
    return {task: colors[index % len(colors)] for index, task in enumerate(task_order(result))}


def log2_intervals(result: StudyResult) -> dict[str, tuple[float, float]]:
    """Per task, the censoring interval (low, high] of log2 r*: the fit's, else from the sweep's grid."""
    if result.fit is not None:
        return {task.task: (float(task.log2_interval[0]), float(task.log2_interval[1])) for task in result.fit.tasks}
    intervals = {}
    for chosen in result.chosen:
        ranks = sorted(row.rank for row in result.rank_rows if row.task == chosen.task)
        if chosen.r_star in ranks:
            low, high = index_interval(np.array(ranks), np.array(ranks.index(chosen.r_star)))
            intervals[chosen.task] = (float(low), float(high))
    return intervals


def _grid_beyond(result: StudyResult) -> tuple[float, float]:
    """One log2 grid step below the smallest and above the largest swept rank (where infinite
    censoring ends are drawn)."""
    ranks = sorted({row.rank for row in result.rank_rows if row.rank > 0} | {c.r_star for c in result.chosen})
    log_ranks = np.log2(ranks) if ranks else np.array([0.0])
    below = log_ranks[1] - log_ranks[0] if len(log_ranks) > 1 else 1.0
    above = log_ranks[-1] - log_ranks[-2] if len(log_ranks) > 1 else 1.0
    return 2.0 ** (log_ranks[0] - below), 2.0 ** (log_ranks[-1] + above)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _interval_bars(values: Sequence[float], intervals: Sequence[tuple[float, float]]) -> np.ndarray:
    """(2, n) error-bar lengths below and above each value; a non-finite end draws no bar."""
    return np.array([[max(_finite(value - low), 0.0) for value, (low, _) in zip(values, intervals)],
                     [max(_finite(high - value), 0.0) for value, (_, high) in zip(values, intervals)]])


def _empty_panel(axis, message: str) -> None:
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=8, transform=axis.transAxes)


def _band(axis, ranks: list[int], means: list[float], ses: list[float], color: str, label: str) -> None:
    means_array, half = np.array(means), Z95 * np.nan_to_num(np.array(ses, float))
    axis.plot(ranks, means_array, marker="o", markersize=3, color=color, label=label)
    axis.fill_between(ranks, means_array - half, means_array + half, color=color, alpha=0.2)


def _rank_curve_panel(axis, result: StudyResult, task: str) -> None:
    rows = sorted((row for row in result.rank_rows if row.task == task and row.rank > 0), key=lambda row: row.rank)
    ranks = [row.rank for row in rows]
    _band(axis, ranks, [row.val_error for row in rows], [row.val_se for row in rows], "tab:blue",
          "validation e(r) +-1.96 SE")
    _band(axis, ranks, [row.test_error for row in rows], [row.test_se for row in rows], "tab:orange",
          "test e(r) +-1.96 SE")
    chosen = next((chosen for chosen in result.chosen if chosen.task == task), None)
    if chosen is not None:
        axis.axvline(chosen.r_star, color="black", linestyle="--", label=f"r* = {chosen.r_star} (validation)")
    share = next((share for share in result.shares if share.task == task), None)
    if share is not None:
        axis.axhline(share.linear_error, color="gray", linestyle=":", label="linear (rank 0, head only), test")
        axis.axhline(share.full_error, color="gray", linestyle="-.", label="full fine-tuning, test")
    log2_rank_axis(axis)
    axis.set_title(f"{task} (gap D {chosen.gap:.3g})" if chosen else task, fontsize=9)
    axis.set_xlabel("LoRA rank r (log2 scale)", fontsize=8)
    axis.set_ylabel("error (task metric)", fontsize=8)
    axis.legend(fontsize=6)


def plot_rank_curves(result: StudyResult, stem: Path) -> list[Path]:
    """Per task (by gap): validation and test error against rank, mean over seeds with a +-1.96 SE band
    over seeds, the validation-chosen r* (dashed), and the linear and full test errors where run."""
    tasks = sorted({row.task for row in result.rank_rows}, key=task_order(result).index)
    if not tasks:
        return []
    columns = min(len(tasks), COLUMNS)
    rows = math.ceil(len(tasks) / columns)
    figure, axes = subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        _rank_curve_panel(axis, result, task)
    for axis in list(axes.flat)[len(tasks):]:
        axis.axis("off")
    figure.suptitle(f"Error against LoRA rank ({result.regime}); r* chosen on validation only")
    figure.tight_layout()
    return save_figure(figure, stem)


def _censored_ranks(axis, result: StudyResult, colors: dict[str, str]) -> None:
    """Each task's r* at its gap, with its censoring interval; infinite ends drawn one grid step beyond
    the grid with an arrow head."""
    intervals, (floor, ceiling) = log2_intervals(result), _grid_beyond(result)
    for chosen in result.chosen:
        low, high = intervals.get(chosen.task, (math.nan, math.nan))
        color = colors[chosen.task]
        if not (math.isnan(low) or math.isnan(high)):
            bottom = 2.0 ** low if math.isfinite(low) else floor
            top = 2.0 ** high if math.isfinite(high) else ceiling
            axis.plot([chosen.gap, chosen.gap], [bottom, top], color=color, linewidth=2, alpha=0.6)
            if not math.isfinite(low):
                axis.plot(chosen.gap, floor, marker="v", color=color)
            if not math.isfinite(high):
                axis.plot(chosen.gap, ceiling, marker="^", color=color)
        axis.plot(chosen.gap, chosen.r_star, marker="o", color=color, linestyle="none")
        axis.annotate(chosen.task, (chosen.gap, chosen.r_star), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_ylim(floor / 1.5, ceiling * 1.5)


def _law_lines(axis, result: StudyResult) -> None:
    """The fitted law and lines at the slope interval's ends through the fit at the centroid."""
    fit = result.fit
    log_gaps = np.log2([task.gap for task in fit.tasks])
    xs = np.linspace(log_gaps.min() - 0.3, log_gaps.max() + 0.3, 50)
    axis.plot(2.0 ** xs, 2.0 ** (fit.intercept + fit.slope * xs), color="black",
              label=f"fit: log2 r* = {fit.intercept:.2f} + {fit.slope:.2f} log2 D (sigma {fit.sigma:.2f})")
    centre = log_gaps.mean()
    for end, style in zip(fit.slope_interval, (":", "--")):
        if math.isfinite(end):
            axis.plot(2.0 ** xs, 2.0 ** (fit.intercept + fit.slope * centre + end * (xs - centre)), color="gray",
                      linestyle=style, label=f"slope {end:.2f} ({fit.level:.0%} interval end), through the "
                                             "fit at the data's centroid (mean log2 D)")


def _law_panel(axis, result: StudyResult, colors: dict[str, str]) -> None:
    if not result.chosen:
        _empty_panel(axis, "no task with a complete rank sweep")
        return
    _censored_ranks(axis, result, colors)
    if result.fit is not None:
        _law_lines(axis, result)
        fit = result.fit
        axis.set_title(f"r* against gap: {fit.verdict} (beta {fit.slope:.2f} "
                       f"[{fit.slope_interval[0]:.2f}, {fit.slope_interval[1]:.2f}])", fontsize=9)
        axis.legend(fontsize=6)
    else:
        axis.set_title(f"r* against gap: no fit ({result.n_tasks} task(s); the fit needs 3)", fontsize=9)
    axis.set_xscale("log")
    log2_rank_axis(axis, "y")
    axis.set_xlabel("gap D (mean floor-corrected MMD^2 over blocks, log scale)")
    axis.set_ylabel("r* on validation (log2; bars: censoring interval)")


def _block_scatter(axis, points: Sequence[BlockPoint], colors: dict[str, str]) -> None:
    """value +-1.96 se against the block's gap (log x), one colour per task; gap-0 blocks counted."""
    shown = [point for point in points if point.gap > 0]
    for task in sorted({point.task for point in shown}):
        mine = [point for point in shown if point.task == task]
        axis.errorbar([p.gap for p in mine], [p.value for p in mine], yerr=[Z95 * _finite(p.se) for p in mine],
                      marker="o", linestyle="none", capsize=2, color=colors[task], label=task)
    axis.set_xscale("log")
    axis.set_xlabel("block gap D_i (floor-corrected, log scale)")
    if len(shown) < len(points):
        axis.text(0.02, 0.02, f"{len(points) - len(shown)} block(s) at gap 0 not shown (log axis)",
                  transform=axis.transAxes, fontsize=7)


def _pooled_trend(axis, points: Sequence[BlockPoint], trend: BlockTrend) -> None:
    """The mixed model's slope of log2(1 + rank) on log2 D_i, drawn through the points' centroid."""
    kept = [point for point in points if point.gap > 0]
    x = np.log2([point.gap for point in kept])
    y = np.log2(1 + np.array([point.value for point in kept]))
    xs = np.linspace(x.min(), x.max(), 50)
    interval = f" [{trend.interval[0]:.2f}, {trend.interval[1]:.2f}]" if trend.interval else ""
    axis.plot(2.0 ** xs, 2.0 ** (y.mean() + trend.statistic * (xs - x.mean())) - 1, color="black",
              label=f"mixed model: slope {trend.statistic:.2f}{interval} of log2(1 + rank) per doubling of D, "
                    f"p {trend.p_value:.2g} (through the centroid)")


def _posterior_panel(axis, result: StudyResult, colors: dict[str, str]) -> None:
    if not result.posterior:
        _empty_panel(axis, "no ibp-lora posterior ranks")
        return
    _block_scatter(axis, result.posterior, colors)
    pooled = next((trend for trend in result.trends if trend.task is None), None)
    if pooled is not None:
        _pooled_trend(axis, result.posterior, pooled)
    axis.set_ylabel("ibp-lora posterior rank (mean over seeds)")
    axis.set_title("Posterior rank per block", fontsize=9)
    axis.legend(fontsize=6)


def plot_rank_vs_gap(result: StudyResult, stem: Path) -> list[Path]:
    """Left: r* (validation) against the gap per task with its censoring interval, the fitted law and
    its slope interval, the verdict in the title. Right: ibp-lora's posterior rank per block against
    the block's gap, with the mixed model's pooled trend."""
    if not result.chosen and not result.posterior:
        return []
    figure, (law_axis, block_axis) = subplots(1, 2, figsize=(12, 4.6))
    colors = task_colors(result)
    _law_panel(law_axis, result, colors)
    _posterior_panel(block_axis, result, colors)
    figure.tight_layout()
    return save_figure(figure, stem)


def plot_block_panel(result: StudyResult, stem: Path) -> list[Path]:
    """Left: the validation error change when one block drops to rank 1 (+-1.96 SE over seeds) against
    the block's gap, a zero line. Right: full fine-tuning's energy rank per block against the gap."""
    if not result.one_block and not result.energy:
        return []
    figure, (change_axis, energy_axis) = subplots(1, 2, figsize=(11, 4))
    colors = task_colors(result)
    if result.one_block:
        _block_scatter(change_axis, result.one_block, colors)
        change_axis.axhline(0, color="gray", linewidth=0.8)
        change_axis.set_ylabel("validation error change, block at rank 1")
        change_axis.set_title("One block at a time", fontsize=9)
        change_axis.legend(fontsize=6)
    else:
        _empty_panel(change_axis, "no one-block runs")
    if result.energy:
        _block_scatter(energy_axis, result.energy, colors)
        energy_axis.set_ylabel("energy rank of W - W0 (90% energy, mean over modules)")
        energy_axis.set_title("Full fine-tuning: energy rank per block", fontsize=9)
        energy_axis.legend(fontsize=6)
    else:
        _empty_panel(energy_axis, "no full fine-tuning runs for energy ranks")
    figure.tight_layout()
    return save_figure(figure, stem)


def method_label(share: MethodShare) -> str:
    """`lora r=8`, `ibp-lora` (its rank is the prior's alpha_0, not a rank)."""
    return share.method if share.method == "ibp-lora" or share.rank is None else f"{share.method} r={share.rank}"


def plot_method_shares(result: StudyResult, stem: Path) -> list[Path]:
    """Per task, each method's share of the linear -> full test gap with its bootstrap interval
    (0: the head alone, 1: full fine-tuning)."""
    tasks = sorted({share.task for share in result.shares}, key=task_order(result).index)
    if not tasks:
        return []
    most = max(sum(share.task == task for share in result.shares) for task in tasks)
    figure, axes = subplots(1, len(tasks), figsize=(4.2 * len(tasks), 1.2 + 0.4 * most), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        shares = [share for share in result.shares if share.task == task]
        positions = np.arange(len(shares))
        values = [share.share for share in shares]
        axis.errorbar(values, positions, xerr=_interval_bars(values, [share.share_interval for share in shares]),
                      marker="o", linestyle="none", capsize=3)
        axis.axvline(0, color="gray", linestyle=":", label="0: linear (head only)")
        axis.axvline(1, color="black", linestyle="--", label="1: full fine-tuning")
        axis.set_yticks(positions, [method_label(share) for share in shares])
        axis.set_xlabel("share of the linear -> full test gap")
        axis.set_title(task, fontsize=9)
        axis.legend(fontsize=6)
    figure.tight_layout()
    return save_figure(figure, stem)


def plot_rank_benefits(result: StudyResult, stem: Path) -> list[Path]:
    """The test rank benefit G = (e(r_low) - e(r_high)) / e(r_high) with its interval, grouped by task,
    one marker per embedder regime (frozen, trained)."""
    if not result.benefits:
        return []
    tasks = sorted({benefit.task for benefit in result.benefits}, key=task_order(result).index)
    regimes = sorted({benefit.regime for benefit in result.benefits})
    figure, axis = subplots(figsize=(1.6 + 1.4 * len(tasks), 3.8))
    for index, regime in enumerate(regimes):
        chosen = [benefit for benefit in result.benefits if benefit.regime == regime]
        offset = (index - (len(regimes) - 1) / 2) * 0.15
        values = [benefit.benefit for benefit in chosen]
        axis.errorbar([tasks.index(benefit.task) + offset for benefit in chosen], values,
                      yerr=_interval_bars(values, [benefit.benefit_interval for benefit in chosen]),
                      marker=REGIME_MARKERS[index % len(REGIME_MARKERS)], linestyle="none", capsize=3, label=regime)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xticks(range(len(tasks)), tasks)
    axis.set_ylabel("rank benefit G on test (lowest vs highest rank)")
    axis.set_title("Rank benefit by embedder regime", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, stem)


def plot_study(result: StudyResult, directory: Path) -> list[Path]:
    """Every study figure the result has data for, under `directory/plots/`."""
    out = Path(directory) / "plots"
    return (plot_rank_curves(result, out / "study_rank_curves") + plot_rank_vs_gap(result, out / "study_rank_vs_gap")
            + plot_block_panel(result, out / "study_blocks")
            + plot_method_shares(result, out / "study_method_shares")
            + plot_rank_benefits(result, out / "study_rank_benefits"))
