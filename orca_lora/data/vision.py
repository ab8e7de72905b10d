"""CIFAR-10 / CIFAR-100 from a local root through torchvision (downloaded only when asked), and
scikit-learn's 8 x 8 handwritten digits (shipped inside scikit-learn: always offline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision import datasets, transforms

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _LocalCIFAR10(datasets.CIFAR10):
    """CIFAR10 that accepts any file in the real pickle layout.

    torchvision checks the md5 sums of the released files, so a subset or a test fixture in the
    same format reads as "corrupted". Setting the sums to None makes its check_integrity test that
    each file exists; the downloaded archive keeps its md5 check (`tgz_md5`).
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _LocalCIFAR100(datasets.CIFAR100):
    """CIFAR100 with existence-only file checks, for the reason given in _LocalCIFAR10."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


@dataclass(frozen=True)
class CifarSpec:
    """One CIFAR variant: its torchvision class, class count and per-channel statistics of its train split."""

    dataset_class: type[datasets.CIFAR10]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def folder(self) -> str:
        return self.dataset_class.base_folder

    @property
    def files(self) -> list[str]:
        listed = self.dataset_class.train_list + self.dataset_class.test_list
        return [name for name, _ in listed] + [self.dataset_class.meta["filename"]]


# Per-channel mean / std of the training images scaled to [0, 1] (the values used by ORCA and
# most CIFAR code bases).
CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(_LocalCIFAR10, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": CifarSpec(_LocalCIFAR100, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _spec(name: str) -> CifarSpec:
    if name not in CIFAR:
        raise KeyError(f"unknown CIFAR dataset {name!r}; choose one of {sorted(CIFAR)}")
    return CIFAR[name]


def num_classes(name: str) -> int:
    """Number of classes of "cifar10" (10) or "cifar100" (100)."""
    return _spec(name).num_classes


def cifar_transform(name: str) -> transforms.Compose:
    """PIL image -> float tensor (3, 32, 32): scaled to [0, 1], then standardised per channel."""
    spec = _spec(name)
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])


def load_cifar(name: str, root: str | Path, train: bool, download: bool = False,
               fetch_hint: str = "set `task.download: true` to fetch it") -> datasets.CIFAR10:
    """CIFAR-10 / CIFAR-100 split from `root` (holding `cifar-10-batches-py` or `cifar-100-python`).

    Items are (image, label): image a float tensor (3, 32, 32), see `cifar_transform`; label an
    int. The returned torchvision dataset also exposes `.targets` (all labels) and `.classes`.
    """
    spec = _spec(name)
    folder = Path(root) / spec.folder
    missing = [file for file in spec.files if not (folder / file).is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"{name}: missing {missing} in {folder}. Put the extracted python-version archive there "
            f"(torchvision expects {folder}/), from {CIFAR_URL}, or {fetch_hint}."
        )
    return spec.dataset_class(str(root), train=train, transform=cifar_transform(name), download=download)


DIGITS_SAMPLES = 1797  # the UCI optical-recognition test set that scikit-learn ships (Alpaydin & Kaynak 1998)
DIGITS_CLASSES = 10


def digits_images(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 images (N, 1, s, s) in [0, 1] (pixel counts 0..16 divided by 16),
    bilinearly resized from 8 x 8 to s x s, and their labels (N,) int64."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    resized = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return resized.numpy(), digits.target.astype(np.int64)


def digits_split(labels: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train and test indices, stratified by class (each split keeps the class proportions).

    The 1,797 images bound n_train + n_test: at n_train = 1000 the test set holds at most 797
    images, so a digits error has a wider interval than the generated tasks' (>= 2,000 images).
    """
    if n_train + n_test > len(labels):
        raise ValueError(f"task.n_train + task.n_test = {n_train + n_test} exceeds the {len(labels)} digits; "
                         f"lower them (e.g. task.n_train=1000, task.n_test={len(labels) - 1000})")
    return train_test_split(np.arange(len(labels)), train_size=n_train, test_size=n_test, stratify=labels,
                            random_state=seed)
