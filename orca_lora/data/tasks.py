"""Task registry: a name -> datasets, input/output shapes, loss, error metric and trivial baseline.

Every task returns a `TaskData`; the model, the stages and the experiments only ever see that.
Losses and errors are computed on decoded outputs (`output_transform`), so Darcy's relative L2 is
measured on physical fields, as in FNO, not on normalised ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from orca_lora.config import SourceConfig, TaskConfig
from orca_lora.data import darcy, procedural, vision
from orca_lora.registry import registrar

PerSample = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TaskData:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int
    input_size: tuple[int, int]
    head: str  # "dense" (a field on a grid), "pooled" (the body's pooled features) or "classification"
    num_outputs: int  # output channels (dense) or classes
    output_size: Optional[tuple[int, int]]
    error: PerSample  # per-sample error in the task's unit (relative L2, or 0/1 misclassification)
    loss: PerSample  # per-sample training loss on decoded outputs
    output_transform: nn.Module  # model output -> task output (Darcy: the target's unit-Gaussian decode)
    baseline_error: float  # the trivial predictor's test error (mean training field / majority class)

    @property
    def regression(self) -> bool:
        return self.head != "classification"


@dataclass(frozen=True)
class SourceSide:
    """What a task built from the source itself reads: the source's config and its frozen body."""

    config: SourceConfig
    body: nn.Module


TASK_BUILDERS: dict[str, Callable[..., TaskData]] = {}  # (config, data_root), or with the source side
SOURCE_TASKS: set[str] = set()  # the tasks whose data or targets come from the source body


register_task = registrar(TASK_BUILDERS)


def register_source_task(name: str) -> Callable[[Callable[[TaskConfig, Path, SourceSide], TaskData]], Callable]:
    """Register a builder called as (config, data_root, source side)."""
    SOURCE_TASKS.add(name)
    return register_task(name)


def build_task(config: TaskConfig, data_root: str | Path, source: SourceSide | None = None) -> TaskData:
    """The registered task `config.name`; the known-answer controls also read the `source` side."""
    if config.name not in TASK_BUILDERS:
        raise KeyError(f"task.name: {config.name!r} is not one of {', '.join(sorted(TASK_BUILDERS))}")
    if config.name not in SOURCE_TASKS:
        return TASK_BUILDERS[config.name](config, Path(data_root))
    if source is None:
        raise ValueError(f"task {config.name} is built from the source body and needs the source side; run it "
                         "through a config (the pipeline passes it)")
    return TASK_BUILDERS[config.name](config, Path(data_root), source)


def split_train_val(train: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Carve a validation split off the training data with a seeded permutation (never the test split)."""
    n = len(train)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise ValueError(f"task.val_fraction: {val_fraction} leaves no training samples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, order[n_val:]), Subset(train, order[:n_val])


def misclassification(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) != labels).float()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def assert_finite(name: str, values: Tensor | np.ndarray) -> None:
    bad = ~np.isfinite(np.asarray(values)) if isinstance(values, np.ndarray) else ~torch.isfinite(values)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} non-finite values (NaN/inf); clean or regenerate the data")


class DecodeField(nn.Module):
    """Model output (B, 1, s, s), normalised -> physical field (B, s, s)."""

    def __init__(self, normalizer: nn.Module):
        super().__init__()
        self.normalizer = normalizer

    def forward(self, output: Tensor) -> Tensor:
        return self.normalizer.decode(output.squeeze(1))


def _darcy_fields(config: TaskConfig, data_root: Path) -> tuple[darcy.DarcyFields, darcy.DarcyFields]:
    if config.file is None:
        n_train, n_test = config.n_train, config.n_test
        fields = darcy.generate_darcy(n_train + n_test, config.resolution, config.data_seed, root=data_root)
        return (darcy.DarcyFields(fields.a[:n_train], fields.u[:n_train]),
                darcy.DarcyFields(fields.a[n_train:], fields.u[n_train:]))
    train = darcy.load_darcy_file(config.file)
    if config.test_file is not None:
        test = darcy.load_darcy_file(config.test_file)
    else:
        n_test = config.n_test or max(1, len(train.a) // 5)
        train, test = (darcy.DarcyFields(train.a[:-n_test], train.u[:-n_test]),
                       darcy.DarcyFields(train.a[-n_test:], train.u[-n_test:]))
    train = darcy.DarcyFields(train.a[: config.n_train], train.u[: config.n_train])
    test = darcy.DarcyFields(test.a[: config.n_test], test.u[: config.n_test])
    r = config.downsample
    return (darcy.DarcyFields(darcy.downsample(train.a, r), darcy.downsample(train.u, r)),
            darcy.DarcyFields(darcy.downsample(test.a, r), darcy.downsample(test.u, r)))


def _relative_l2_loss(prediction: Tensor, target: Tensor) -> Tensor:
    return darcy.relative_l2(prediction, target)


def field_task(name: str, a_train: Tensor, u_train: Tensor, a_test: Tensor, u_test: Tensor,
               config: TaskConfig) -> TaskData:
    """A field-to-field regression task from raw input fields a and targets u (N, s, s).

    Inputs are (a, x, y) with a standardised pointwise on train; targets are standardised for the
    model and decoded for the loss and the metric (relative L2 on physical fields, as in FNO).
    The trivial predictor is the mean training field.
    """
    a_normalizer = darcy.UnitGaussianNormalizer(a_train)
    u_normalizer = darcy.UnitGaussianNormalizer(u_train)
    x_train = darcy.darcy_inputs(a_normalizer.encode(a_train))
    x_test = darcy.darcy_inputs(a_normalizer.encode(a_test))
    train, val = split_train_val(TensorDataset(x_train, u_train), config.val_fraction, config.data_seed)
    mean_field = u_train.mean(dim=0, keepdim=True).expand_as(u_test)
    side = tuple(u_train.shape[-2:])
    return TaskData(
        name=name, train=train, val=val, test=TensorDataset(x_test, u_test),
        in_channels=x_train.shape[1], input_size=side, head="dense", num_outputs=1, output_size=side,
        error=darcy.relative_l2, loss=_relative_l2_loss, output_transform=DecodeField(u_normalizer),
        baseline_error=float(darcy.relative_l2(mean_field, u_test).mean()),
    )


@register_task("darcy")
def darcy_task(config: TaskConfig, data_root: Path) -> TaskData:
    train_fields, test_fields = _darcy_fields(config, data_root)
    for name, array in (("a (train)", train_fields.a), ("u (train)", train_fields.u),
                        ("a (test)", test_fields.a), ("u (test)", test_fields.u)):
        assert_finite(f"darcy {name}", array)
    return field_task("darcy", torch.from_numpy(train_fields.a).float(), torch.from_numpy(train_fields.u).float(),
                      torch.from_numpy(test_fields.a).float(), torch.from_numpy(test_fields.u).float(), config)


def classification_task(name: str, train: Dataset, test: Dataset, train_labels: Tensor,
                        test_labels: Tensor, num_classes: int, config: TaskConfig) -> TaskData:
    train, val = split_train_val(train, config.val_fraction, config.data_seed)
    majority = torch.bincount(train_labels, minlength=num_classes).argmax()
    image, _ = test[0]
    return TaskData(
        name=name, train=train, val=val, test=test, in_channels=image.shape[0],
        input_size=tuple(image.shape[-2:]), head="classification", num_outputs=num_classes,
        output_size=None, error=misclassification, loss=cross_entropy, output_transform=nn.Identity(),
        baseline_error=float((test_labels != majority).float().mean()),
    )


def procedural_arrays(config: TaskConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of held-out procedural classes (ids from `class_offset`),
    task.resolution pixels a side: one class-balanced draw, shuffled by `data_seed`, test first."""
    total = config.n_train + config.n_test
    per_class = math.ceil(total / config.n_classes)
    images = procedural.generate_procedural(config.n_classes, per_class, image_size=config.resolution,
                                            seed=config.data_seed, class_offset=config.class_offset)
    order = torch.randperm(len(images.labels), generator=torch.Generator().manual_seed(config.data_seed)).numpy()
    x, y = images.images[order], images.labels[order]
    return x[config.n_test: total], y[config.n_test: total], x[: config.n_test], y[: config.n_test]


def classification_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                          y_test: np.ndarray, num_classes: int, config: TaskConfig) -> TaskData:
    """`classification_task` on numpy images (N, C, H, W) and labels (N,)."""
    x_train, x_test = torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(np.ascontiguousarray(x_test))
    y_train, y_test = torch.from_numpy(np.ascontiguousarray(y_train)), torch.from_numpy(np.ascontiguousarray(y_test))
    return classification_task(name, TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), y_train, y_test,
                               num_classes, config)


@register_task("procedural")
def procedural_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Held-out procedural classes (ids from `class_offset`): a near-source target for the offline body."""
    return classification_arrays("procedural", *procedural_arrays(config), config.n_classes, config)


def _cifar_task(name: str, config: TaskConfig, data_root: Path) -> TaskData:
    root = data_root / "cifar"
    train = vision.load_cifar(name, root, train=True, download=config.download)
    test = vision.load_cifar(name, root, train=False, download=config.download)
    train_labels = torch.as_tensor(train.targets)
    test_labels = torch.as_tensor(test.targets)
    if config.n_train is not None:
        train, train_labels = Subset(train, range(config.n_train)), train_labels[: config.n_train]
    if config.n_test is not None:
        test, test_labels = Subset(test, range(config.n_test)), test_labels[: config.n_test]
    return classification_task(name, train, test, train_labels, test_labels, vision.num_classes(name), config)


@register_task("cifar10")
def cifar10_task(config: TaskConfig, data_root: Path) -> TaskData:
    return _cifar_task("cifar10", config, data_root)


@register_task("cifar100")
def cifar100_task(config: TaskConfig, data_root: Path) -> TaskData:
    return _cifar_task("cifar100", config, data_root)

