"""CIFAR-10 / CIFAR-100 from a local root through torchvision (downloaded only when asked)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
