import hashlib
import re

import numpy as np
import pytest
import torch

from orca_lora.config import ConfigError, TaskConfig
from orca_lora.config_load import load_config
from orca_lora.data import procedural
from orca_lora.data.task_builders import ARRAY_KEYS, cache_path
from orca_lora.data.tasks import build_task, procedural_arrays

GENERATED = ("procedural-noise", "procedural-permuted", "procedural-inverted", "procedural-fourier", "digits",
             "spectrogram", "grf-texture", "poisson", "helmholtz", "heat")
SMALL = dict(n_train=50, n_test=30, resolution=16, n_classes=4, val_fraction=0.2)


def small(name: str, **settings) -> TaskConfig:
    return TaskConfig(name=name, **{**SMALL, **settings})


def split_arrays(dataset) -> list[np.ndarray]:
    return [np.asarray(dataset[i][0]) for i in range(len(dataset))]


def all_arrays(task) -> np.ndarray:
    return np.stack(split_arrays(task.train) + split_arrays(task.val) + split_arrays(task.test))


def digests(dataset) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in split_arrays(dataset)}


@pytest.mark.parametrize("name", GENERATED)
def test_generated_task_shapes_and_disjoint_splits(name, tmp_path):
    task = build_task(small(name), tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (40, 10, 30)
    x, y = task.test[0]
    assert x.shape[-2:] == (16, 16) and task.input_size == (16, 16) and task.in_channels == x.shape[0]
    if task.regression:
        assert y.shape == (16, 16) and 0 < task.baseline_error
    else:
        assert y.ndim == 0 and 0 < task.baseline_error < 1 and task.num_outputs >= 4
    train, val, test = digests(task.train), digests(task.val), digests(task.test)
    assert len(train) == 40 and len(val) == 10 and len(test) == 30  # no sample repeated within a split
    assert not (train & val) and not (train & test) and not (val & test)


@pytest.mark.parametrize("name", ("procedural-noise", "spectrogram", "grf-texture", "helmholtz"))
def test_arrays_follow_the_data_seed_only(name, tmp_path):
    first = all_arrays(build_task(small(name), tmp_path / "a"))
    again = all_arrays(build_task(small(name), tmp_path / "b"))  # regenerated in a fresh root
    cached = all_arrays(build_task(small(name), tmp_path / "a"))  # read back from the cache
    other = all_arrays(build_task(small(name, data_seed=1), tmp_path / "a"))
    assert np.array_equal(first, again) and np.array_equal(first, cached)
    assert not np.allclose(first, other)


def test_the_training_seed_leaves_the_arrays_unchanged(tmp_path):
    sizes = [f"task.{key}={value}" for key, value in SMALL.items()]
    arrays = []
    for seed in (0, 7):
        config = load_config(None, ["task.name=procedural-permuted", f"seed={seed}", *sizes])
        arrays.append(all_arrays(build_task(config.task, tmp_path / str(seed))))
    assert np.array_equal(*arrays)


def test_cache_key_holds_the_tasks_own_dials(tmp_path):
    base = cache_path(small("helmholtz"), tmp_path)
    assert cache_path(small("helmholtz", wavenumber=2.5), tmp_path) != base
    assert cache_path(small("helmholtz", noise=0.9), tmp_path) == base  # a dial helmholtz does not read
    assert cache_path(small("helmholtz", n_test=31), tmp_path) != base
    build_task(small("helmholtz"), tmp_path)
    assert base.is_file() and base.parent == tmp_path / "helmholtz"
    assert {"procedural-noise", "poisson", "heat"} <= set(ARRAY_KEYS)


def test_dials_act_on_the_base_procedural_images(tmp_path):
    x_train, y_train, _, _ = procedural_arrays(small("procedural"))

    def train_images(name, **settings):
        task = build_task(small(name, **settings), tmp_path)
        return task.train.dataset.tensors[0].numpy(), task.train.dataset.tensors[1].numpy()

    inverted, labels = train_images("procedural-inverted")
    np.testing.assert_allclose(inverted, 1 - x_train, atol=1e-6)
    assert np.array_equal(labels, y_train)
    noisy, _ = train_images("procedural-noise", noise=0.5)
    assert abs(np.std(noisy - x_train) - 0.5) < 0.01 and (noisy < 0).any()  # not clipped
    assert np.array_equal(train_images("procedural-noise", noise=0.0)[0], x_train)
    permuted, _ = train_images("procedural-permuted")
    assert not np.array_equal(permuted, x_train)
    assert np.array_equal(np.sort(permuted.reshape(len(x_train), 3, -1)), np.sort(x_train.reshape(len(x_train), 3, -1)))
    assert np.array_equal(train_images("procedural-permuted", permute_fraction=0.0)[0], x_train)
    fourier, _ = train_images("procedural-fourier")
    spectrum = np.expm1(fourier[:, :3]) * np.exp(1j * np.pi * fourier[:, 3:])
    recovered = np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1))).real
    np.testing.assert_allclose(recovered, x_train, atol=1e-3)  # invertible (float32 storage)


def test_tile_permutation_moves_whole_tiles():
    images = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    order = procedural.tile_permutation(8, 4, 1.0, np.random.default_rng(1))
    assert sorted(order) == [0, 1, 2, 3]
    moved = procedural.permute_tiles(images, 4, order)
    tiles = [images[..., r:r + 4, c:c + 4] for r in (0, 4) for c in (0, 4)]
    for t, source in enumerate(order):
        r, c = divmod(t, 2)
        assert np.array_equal(moved[..., 4 * r:4 * r + 4, 4 * c:4 * c + 4], tiles[source])
    half = procedural.tile_permutation(32, 1, 0.5, np.random.default_rng(2))
    assert np.sum(half != np.arange(1024)) <= 512
    with pytest.raises(ValueError, match="task.tile"):
        procedural.tile_permutation(16, 3, 1.0, np.random.default_rng(0))


def test_digits_are_stratified_and_bounded_by_the_dataset(tmp_path):
    task = build_task(TaskConfig(name="digits", n_train=1000, n_test=797), tmp_path)
    labels = task.test.tensors[1]
    assert torch.bincount(labels).min() >= 75  # ~80 per class in a stratified 797
    with pytest.raises(ValueError, match=re.escape("task.n_train + task.n_test")):
        build_task(TaskConfig(name="digits", n_train=1000, n_test=800), tmp_path)


@pytest.mark.parametrize("override, key", [
    (["task.name=procedural-noise", "task.noise=1.5"], "task.noise"),
    (["task.name=procedural-permuted", "task.permute_fraction=-0.1"], "task.permute_fraction"),
    (["task.name=procedural-permuted", "task.tile=5"], "task.tile"),
    (["task.name=procedural-permuted", "task.tile=0"], "task.tile"),
    (["task.name=helmholtz", "task.wavenumber=5"], "task.wavenumber"),
    (["task.name=helmholtz", "task.wavenumber=0.5"], "task.wavenumber"),
    (["task.name=heat", "task.time=0"], "task.time"),
    (["task.name=spectrogram", "task.n_test=null"], "task.n_test"),
    (["task.name=procedural-fourier", "task.data_seed=3"], "task.data_seed"),
])
def test_bad_dials_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, override)


def test_a_dial_the_task_does_not_read_is_not_checked():
    assert load_config(None, ["task.name=poisson", "task.noise=3"]).task.noise == 3


@pytest.mark.parametrize("name", ["procedural-noise", "spectrogram", "poisson"])
def test_a_damaged_task_cache_is_named_and_rebuilt(name, tmp_path, caplog):
    config = small(name)
    first = all_arrays(build_task(config, tmp_path))
    path = cache_path(config, tmp_path)
    assert (path.parent / (path.name + ".sha256")).is_file()
    with open(path, "r+b") as stream:
        stream.truncate(path.stat().st_size // 2)
    caplog.set_level("WARNING", logger="orca_lora")
    again = all_arrays(build_task(config, tmp_path))
    assert f"cached {path} does not match its content hash" in caplog.text
    assert np.array_equal(first, again)
