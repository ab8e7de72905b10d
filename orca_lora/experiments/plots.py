"""Figures from saved run files (PNG and PDF), never from stage internals."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def save_figure(figure, stem: Path) -> list[Path]:
    """Write `stem.png` and `stem.pdf` through temp files, so no half-written figure is left."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in ("png", "pdf"):
        final = stem.with_suffix(f".{suffix}")
        temp = final.with_name(f".{final.name}.tmp")
        try:
            figure.savefig(temp, format=suffix, dpi=150, bbox_inches="tight")
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            plt.close(figure)
            raise
        written.append(final)
    plt.close(figure)
    return written


def plot_alignment(curve_csv: Path, stem: Path) -> list[Path]:
    rows = read_csv(curve_csv)
    distance = [key for key in rows[0] if key != "epoch"][0]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([int(r["epoch"]) for r in rows], [float(r[distance]) for r in rows], marker="o", label=distance)
    axis.set_xlabel("epoch (0 = before training)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(f"{distance} to source features (squared feature units)")
    axis.set_title("Stage 1: embedder alignment")
    axis.legend()
    return save_figure(figure, stem)


def plot_gaps_and_ranks(gaps_csv: Path, stem: Path) -> list[Path]:
    rows = read_csv(gaps_csv)
    blocks = [int(r["block"]) for r in rows]
    figure, gap_axis = plt.subplots(figsize=(6, 3.5))
    gap_axis.bar(blocks, [float(r["gap"]) for r in rows], color="tab:blue", alpha=0.7, label="gap D_i")
    gap_axis.set_xlabel("Swin block (forward order)")
    gap_axis.set_ylabel("modality gap D_i (standardised features)")
    rank_axis = gap_axis.twinx()
    rank_axis.plot(blocks, [int(r["rank"]) for r in rows], color="tab:red", marker="o", label="LoRA rank r_i")
    rank_axis.set_ylabel("LoRA rank r_i")
    gap_axis.set_title("Stage 2: gap and rank per block")
    handles = gap_axis.get_legend_handles_labels()[0] + rank_axis.get_legend_handles_labels()[0]
    gap_axis.legend(handles, [h.get_label() for h in handles], loc="upper right")
    return save_figure(figure, stem)


def plot_training(metrics_csv: Path, stem: Path, baseline_error: float | None = None) -> list[Path]:
    rows = read_csv(metrics_csv)
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    val = [(int(r["step"]), float(r["val_error"])) for r in rows if r.get("val_error")]
    figure, axis = plt.subplots(figsize=(5, 3.5))
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
    out = run_dir / "plots"
    alignment = run_dir / "stage1" / "alignment.csv"
    gaps = run_dir / "stage2" / "gaps.csv"
    training = run_dir / "stage3" / "logs" / "version_0" / "metrics.csv"
    metrics = run_dir / "metrics.json"
    written = []
    if alignment.is_file():
        written += plot_alignment(alignment, out / "alignment")
    if gaps.is_file():
        written += plot_gaps_and_ranks(gaps, out / "gaps_and_ranks")
    if training.is_file():
        baseline = json.loads(metrics.read_text())["baseline_error"] if metrics.is_file() else None
        written += plot_training(training, out / "training", baseline)
    return written
