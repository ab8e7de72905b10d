"""The house style of every figure: made without pyplot, saved as PNG and PDF atomically, one
colour cycle, a log-2 rank axis with integer labels."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from orca_lora.files import save_figure_atomic


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


def log2_rank_axis(axis, which: str = "x") -> None:
    """Log-2 rank axis labelled 1, 2, 4, ... rather than 2^0, 2^1, ..."""
    (axis.set_xscale if which == "x" else axis.set_yscale)("log", base=2)
    scale = axis.xaxis if which == "x" else axis.yaxis
    scale.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    scale.set_minor_locator(NullLocator())


def integer_rank_axis(axis, ranks: Sequence[float], which: str = "y") -> None:
    """A rank axis from 0 with integer ticks only: a constant rank (every block at 2) is drawn as a level
    line at 2, not blown up to fill an axis from 1.9 to 2.1."""
    top = max([float(rank) for rank in ranks if rank is not None] or [1.0])
    limits = (0, top + max(1.0, 0.1 * top))
    (axis.set_ylim if which == "y" else axis.set_xlim)(*limits)
    (axis.yaxis if which == "y" else axis.xaxis).set_major_locator(MaxNLocator(integer=True))


def legend_below(axis, *twins, columns: int = 2, fontsize: int = 7) -> None:
    """One legend for `axis` and its twin axes, placed under the plot so it covers no data."""
    handles = [handle for each in (axis, *twins) for handle in each.get_legend_handles_labels()[0]]
    axis.legend(handles, [handle.get_label() for handle in handles], loc="upper center", fontsize=fontsize,
                bbox_to_anchor=(0.5, -0.18), ncol=columns, frameon=False)
