import numpy as np
import pytest
import torch

from orca_lora.choices import TASKS, check_registry
from orca_lora.config import TaskConfig
from orca_lora.data import darcy
from orca_lora.data.tasks import TASK_BUILDERS, build_task, split_train_val


def test_registry_matches_choices():
    check_registry("task", TASK_BUILDERS, TASKS)
    assert set(TASK_BUILDERS) == set(TASKS)


def test_darcy_task_shapes_split_and_baseline(tmp_path):
    config = TaskConfig(name="darcy", resolution=12, n_train=20, n_test=6, val_fraction=0.25)
    task = build_task(config, tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (15, 5, 6)
    x, u = task.test[0]
    assert x.shape == (3, 12, 12) and u.shape == (12, 12)
    assert task.head == "dense" and task.output_size == (12, 12) and task.regression
    # the trivial predictor's error, recomputed from the raw generated fields
    fields = darcy.generate_darcy(26, 12, 0, root=tmp_path)
    mean = fields.u[:20].mean(axis=0)
    expected = np.mean([np.linalg.norm(mean - u) / np.linalg.norm(u) for u in fields.u[20:]])
    assert task.baseline_error == pytest.approx(expected, rel=1e-4)
    # decoding the normalised truth gives back the physical field
    train_u = torch.from_numpy(fields.u[:20])
    encoded = darcy.UnitGaussianNormalizer(train_u).encode(torch.from_numpy(fields.u[20:]))
    decoded = task.output_transform(encoded.unsqueeze(1))
    assert torch.allclose(decoded, torch.from_numpy(fields.u[20:]), atol=1e-5)


def test_validation_split_is_disjoint_and_seeded():
    data = list(range(50))
    train, val = split_train_val(data, 0.2, seed=1)
    assert sorted(list(train.indices) + list(val.indices)) == data
    again_train, again_val = split_train_val(data, 0.2, seed=1)
    assert list(val.indices) == list(again_val.indices)
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val([1], 0.5, seed=0)


def test_procedural_task_uses_held_out_classes(tmp_path):
    config = TaskConfig(name="procedural", n_classes=4, n_train=200, n_test=40, class_offset=50)
    task = build_task(config, tmp_path)
    image, label = task.train[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 4
    assert task.head == "classification" and task.num_outputs == 4
    assert (len(task.train) + len(task.val), len(task.test)) == (200, 40)
    assert 0.5 < task.baseline_error < 0.95  # majority class of 4


def test_nan_in_a_darcy_file_is_reported(tmp_path):
    a = np.full((4, 9, 9), 3.0, dtype=np.float32)
    u = np.ones_like(a)
    u[1, 2, 2] = np.nan
    path = tmp_path / "bad.pt"
    torch.save({"x": torch.from_numpy(a), "y": torch.from_numpy(u)}, path)
    config = TaskConfig(name="darcy", file=str(path), n_train=3, n_test=1)
    with pytest.raises(ValueError, match="NaN"):
        build_task(config, tmp_path)


def test_unknown_task_lists_choices(tmp_path):
    with pytest.raises(KeyError, match="darcy"):
        build_task(TaskConfig(name="imagenet"), tmp_path)
