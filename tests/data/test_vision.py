import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from orca_lora.data.vision import CIFAR, load_cifar, num_classes

PER_BATCH = 3


def _dump(path: Path, contents: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(contents, file)


def _pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_cifar10(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-version layout: data_batch_1..5, test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _pixels(rng, PER_BATCH), rng.integers(0, 10, PER_BATCH).tolist()
        _dump(folder / name, {"batch_label": name, "labels": labels, "data": data, "filenames": ["x.png"] * PER_BATCH})
        written[name] = (data, labels)
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return written


def _write_cifar100(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-version layout: train, test, meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name in ("train", "test"):
        data, fine = _pixels(rng, PER_BATCH), rng.integers(0, 100, PER_BATCH).tolist()
        coarse = [label // 5 for label in fine]
        _dump(folder / name, {"data": data, "fine_labels": fine, "coarse_labels": coarse, "filenames": ["x"] * 3})
        written[name] = (data, fine)
    names = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    _dump(folder / "meta", names)
    return written


def _expected_image(row: np.ndarray, name: str) -> torch.Tensor:
    spec = CIFAR[name]
    image = row.reshape(3, 32, 32).astype(np.float32) / 255
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    return torch.from_numpy((image - mean[:, None, None]) / std[:, None, None])


def test_cifar10_tiny_round_trip(tmp_path):
    written = _write_cifar10(tmp_path, np.random.default_rng(0))
    train = load_cifar("cifar10", tmp_path, train=True)
    test = load_cifar("cifar10", tmp_path, train=False)
    assert len(train) == 5 * PER_BATCH and len(test) == PER_BATCH
    image, label = train[PER_BATCH + 1]  # second image of data_batch_2
    data, labels = written["data_batch_2"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    torch.testing.assert_close(image, _expected_image(data[1], "cifar10"))
    assert isinstance(label, int) and label == labels[1]
    assert test.targets == written["test_batch"][1]
    assert train.classes[3] == "class3"


def test_cifar100_tiny_round_trip(tmp_path):
    written = _write_cifar100(tmp_path, np.random.default_rng(1))
    for split, train in (("train", True), ("test", False)):
        dataset = load_cifar("cifar100", tmp_path, train=train)
        data, fine = written[split]
        assert dataset.targets == fine
        image, label = dataset[2]
        torch.testing.assert_close(image, _expected_image(data[2], "cifar100"))
        assert label == fine[2]


def test_num_classes():
    assert num_classes("cifar10") == 10 and num_classes("cifar100") == 100
    with pytest.raises(KeyError, match="cifar10.*cifar100"):
        num_classes("mnist")


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_files_say_where_and_how(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as error:
        load_cifar(name, tmp_path, train=True)
    message = str(error.value)
    assert str(tmp_path / folder) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "task.download: true" in message


def test_partial_folder_lists_missing_files(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar("cifar10", tmp_path, train=True)
