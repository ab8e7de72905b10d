"""The task family at a glance: one line per registered task, and a thumbnail grid of each.

`orca-lora tasks` prints `format_catalog(catalog(...))`; `orca-lora tasks --show DIR` also writes
`write_task_grid(...)`. Tasks whose data is not on disk (CIFAR without its files) are listed with
the reason instead of their shapes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from orca_lora.choices import TASKS
from orca_lora.config import TaskConfig
from orca_lora.data.tasks import TaskData, build_task

# What each task is, and the dials (TaskConfig keys) that move it
TASK_NOTES: dict[str, str] = {
    "darcy": "Darcy flow, -div(a grad u) = 1, a thresholded GRF (FNO, Li et al. 2021)",
    "cifar10": "CIFAR-10 from a local root (Krizhevsky 2009)",
    "cifar100": "CIFAR-100 from a local root (Krizhevsky 2009)",
    "procedural": "held-out FractalDB-style classes (Kataoka et al. 2020): near the source",
    "procedural-noise": "procedural + N(0, noise^2) per pixel; dial: noise",
    "procedural-permuted": "procedural, fixed tile/pixel bijection; dials: permute_fraction, tile",
    "procedural-inverted": "procedural as 1 - x: a gap a linear embedder removes (control)",
    "procedural-fourier": "procedural as log|FFT| and phase per channel (6 channels)",
    "digits": "scikit-learn 8x8 digits (Alpaydin & Kaynak 1998), resized; <= 1,797 images",
    "spectrogram": "log-power STFT of 10 synthetic signal classes (chirps, AM, FM, ...)",
    "grf-texture": "GRFs of 10 (alpha, tau) laws, standardised: texture statistics only",
    "poisson": "-Laplace u = f on Darcy's continuous GRF f",
    "helmholtz": "-Laplace u - k^2 u = f, same f; dial: wavenumber",
    "heat": "u(T) of u_t = Laplace u, u(0) = f, same f; dial: time",
    "planted-shift": "source classes, a planted rank-k patch map; target: the body's clean pooled features; "
                     "dials: planted_k, planted_angle (known-answer control)",
    "planted-function": "source classes unchanged; target: the pooled features of the body with a planted rank-k "
                        "change on one module; dials: planted_module, planted_k, planted_angle (known-answer control)",
}


@dataclass
class TaskSummary:
    name: str
    note: str
    input_shape: Optional[tuple[int, ...]] = None  # (C, H, W) of one input
    output_shape: Optional[tuple[int, ...]] = None  # () for a class label, (H, W) for a field
    sizes: Optional[tuple[int, int, int]] = None  # train, val, test
    metric: Optional[str] = None
    baseline_error: Optional[float] = None
    unavailable: Optional[str] = None  # why the task could not be built here


def summarize(task: TaskData) -> TaskSummary:
    x, y = task.test[0]
    return TaskSummary(
        name=task.name, note=TASK_NOTES.get(task.name, ""), input_shape=tuple(x.shape), output_shape=tuple(y.shape),
        sizes=(len(task.train), len(task.val), len(task.test)),
        metric="relative L2" if task.regression else f"misclassification ({task.num_outputs} classes)",
        baseline_error=task.baseline_error,
    )


def catalog(config: TaskConfig, data_root: str | Path, names: Sequence[str] = TASKS) -> list[TaskSummary]:
    """Build each task `names` with the settings of `config` (its name replaced) and summarise it."""
    rows = []
    for name in names:
        try:
            rows.append(summarize(build_task(dataclasses.replace(config, name=name), data_root)))
        except (OSError, ValueError) as error:  # missing files (CIFAR), sizes a real dataset cannot meet
            reason = str(error).split(". ")[0]  # its first sentence: what is missing where
            rows.append(TaskSummary(name=name, note=TASK_NOTES.get(name, ""), unavailable=reason))
    return rows


def format_catalog(rows: Sequence[TaskSummary]) -> str:
    """A fixed-width table: name, input -> output shape, train/val/test, metric, trivial baseline, note."""
    header = f"{'task':<20} {'input -> output':<26} {'train/val/test':<15} {'metric':<30} {'baseline':>8}  what"
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.unavailable is not None:
            lines.append(f"{row.name:<20} {'not available: ' + row.unavailable}")
            continue
        shapes = f"{'x'.join(map(str, row.input_shape))} -> {'x'.join(map(str, row.output_shape)) or 'class'}"
        sizes = "/".join(map(str, row.sizes))
        lines.append(f"{row.name:<20} {shapes:<26} {sizes:<15} {row.metric:<30} {row.baseline_error:>8.3f}  {row.note}")
    return "\n".join(lines)


def _display(image: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    """An image (C, H, W) as matplotlib shows it: 3 channels as RGB, else channel 0 with a colour map;
    each rescaled to its own [min, max] so that noisy or standardised inputs are neither blank nor
    saturated."""
    shown = np.transpose(image, (1, 2, 0)) if image.shape[0] == 3 else image[0]
    low, high = shown.min(), shown.max()
    return (shown - low) / max(high - low, 1e-12), None if image.shape[0] == 3 else "viridis"


def _examples(task: TaskData, count: int) -> list[tuple[np.ndarray, np.ndarray | int]]:
    """`count` test samples; for classification the first of each class in turn, so the row shows classes."""
    if task.regression:
        return [tuple(np.asarray(part) for part in task.test[i]) for i in range(min(count, len(task.test)))]
    chosen, seen = [], set()
    for i in range(len(task.test)):
        x, y = task.test[i]
        if int(y) not in seen:
            seen.add(int(y))
            chosen.append((np.asarray(x), int(y)))
        if len(chosen) == count:
            break
    return chosen


def write_task_grid(config: TaskConfig, data_root: str | Path, directory: str | Path, samples: int = 8,
                    names: Sequence[str] = TASKS) -> Path:
    """`<directory>/tasks.png`: `samples` test inputs of each buildable task in one row (classification:
    one per class, titled by label), and for regression a second row with the target fields."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, list[tuple[np.ndarray, str]]]] = []
    for name in names:
        try:
            task = build_task(dataclasses.replace(config, name=name), data_root)
        except (OSError, ValueError):
            continue  # listed as unavailable by `catalog`
        examples = _examples(task, samples)
        if task.regression:
            rows.append((f"{name}\ninput", [(x[:1], "") for x, _ in examples]))  # the field, not its x, y
            rows.append((f"{name}\ntarget u", [(u[None], "") for _, u in examples]))
        else:
            rows.append((name, [(x, f"class {y}") for x, y in examples]))
    figure, axes = plt.subplots(len(rows), samples, figsize=(1.3 * samples + 1.2, 1.45 * len(rows)), squeeze=False)
    for row_axes, (label, images) in zip(axes, rows):
        for column, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(images):
                ax.axis("off")
                continue
            image, title = images[column]
            shown, cmap = _display(image)
            ax.imshow(shown, cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=7, pad=2)
        row_axes[0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    figure.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
    path = Path(directory) / "tasks.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
