"""The house style of every figure: made without pyplot, saved as PNG and PDF atomically, one
colour cycle, a log-2 rank axis with integer labels."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

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


def rank_axis(axis) -> None:
    """Log-2 rank axis labelled 1, 2, 4, ... rather than 2^0, 2^1, ..."""
    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_locator(NullLocator())
