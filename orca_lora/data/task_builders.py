"""The generated target family (README, "Target tasks"): tasks whose modality gap to the procedural source differs.

Every task here is generated offline, deterministic in `task.data_seed` (never the training
`seed`), and cached at `<data_root>/<task>/<task>_<key>.npz`, the key hashing every setting that
changes the arrays. Splits: train and test come from one seeded draw over disjoint samples;
validation is carved from train by `split_train_val`.

- procedural dials (held-out procedural classes, labels unchanged): `procedural-noise`,
  `procedural-permuted`, `procedural-inverted`, `procedural-fourier`;
- other content: `digits` (Alpaydin & Kaynak 1998, via scikit-learn), `spectrogram`, `grf-texture`;
- PDE operators on Darcy's GRF inputs: `poisson`, `helmholtz`, `heat` (regression, relative L2).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from orca_lora.config import TaskConfig
from orca_lora.data import pde, procedural, signals, textures, vision
from orca_lora.data.tasks import (TaskData, assert_finite, classification_arrays, field_task, procedural_arrays,
                                  register_task)
from orca_lora.files import cache_is_valid, save_npz_atomic, write_digest

Arrays = dict[str, np.ndarray]
_DIAL_STREAM = 4  # seed-sequence tag of the dials' generator (procedural uses 0 and 1, signals 2, textures 3)
SIZE_KEYS = ("data_seed", "n_train", "n_test", "resolution")  # change every generated task's arrays
PROCEDURAL_KEYS = SIZE_KEYS + ("n_classes", "class_offset")
# The dials each task reads: with the keys above, everything that changes its arrays (the cache key).
ARRAY_KEYS = {
    "procedural-noise": PROCEDURAL_KEYS + ("noise",),
    "procedural-permuted": PROCEDURAL_KEYS + ("permute_fraction", "tile"),
    "procedural-inverted": PROCEDURAL_KEYS,
    "procedural-fourier": PROCEDURAL_KEYS,
    "spectrogram": SIZE_KEYS,
    "grf-texture": SIZE_KEYS,
    "poisson": SIZE_KEYS,
    "helmholtz": SIZE_KEYS + ("wavenumber",),
    "heat": SIZE_KEYS + ("time",),
}


def cache_path(config: TaskConfig, data_root: Path) -> Path:
    """`<data_root>/<task>/<task>_<key>.npz`, key = a hash of the task's ARRAY_KEYS settings."""
    settings = {key: getattr(config, key) for key in ARRAY_KEYS[config.name]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_root) / config.name / f"{config.name}_{key}.npz"


def cached_arrays(config: TaskConfig, data_root: Path, build: Callable[[], Arrays]) -> Arrays:
    """The arrays `build()` returns, read from the cache when it matches its content hash, else built,
    checked finite and cached with its hash (a damaged cache is named, deleted and rebuilt)."""
    path = cache_path(config, data_root)
    if cache_is_valid(path):
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    arrays = build()
    for key, array in arrays.items():
        assert_finite(f"{config.name} {key}", array)
    save_npz_atomic(path, **arrays)
    write_digest(path)
    return arrays


def dial_generator(config: TaskConfig) -> np.random.Generator:
    """The dials' own generator: derived from `task.data_seed`, apart from the base images' draws."""
    return np.random.default_rng([config.data_seed, _DIAL_STREAM])


def _procedural_dial(config: TaskConfig, data_root: Path, dial: Callable[[np.ndarray], np.ndarray]) -> TaskData:
    """Held-out procedural classes (as the `procedural` task draws them) with `dial` applied to the
    test and training images together (test first), labels unchanged."""
    def build() -> Arrays:
        x_train, y_train, x_test, y_test = procedural_arrays(config)
        x = dial(np.concatenate([x_test, x_train]))
        return {"x_train": x[len(x_test):], "y_train": y_train, "x_test": x[: len(x_test)], "y_test": y_test}

    arrays = cached_arrays(config, data_root, build)
    return classification_arrays(config.name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                                 arrays["y_test"], config.n_classes, config)


@register_task("procedural-noise")
def procedural_noise_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Procedural images plus Gaussian noise of std `task.noise`, drawn once per sample, not clipped."""
    rng = dial_generator(config)
    return _procedural_dial(config, data_root, lambda x: procedural.add_noise(x, config.noise, rng))


@register_task("procedural-permuted")
def procedural_permuted_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Procedural images with a fixed seeded bijection of their `task.tile`-pixel tiles, moving a
    fraction `task.permute_fraction` of them (tile = 1: pixels). The Bayes error is unchanged."""
    order = procedural.tile_permutation(config.resolution, config.tile, config.permute_fraction,
                                        dial_generator(config))
    return _procedural_dial(config, data_root, lambda x: procedural.permute_tiles(x, config.tile, order))


@register_task("procedural-inverted")
def procedural_inverted_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Procedural images as 1 - x: a gap a linear embedder removes (the control)."""
    return _procedural_dial(config, data_root, procedural.invert)


@register_task("procedural-fourier")
def procedural_fourier_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Procedural images as log-magnitude and phase of each channel's 2-D DFT (6 channels)."""
    return _procedural_dial(config, data_root, procedural.fourier_channels)


@register_task("digits")
def digits_task(config: TaskConfig, data_root: Path) -> TaskData:
    """scikit-learn's 1,797 8 x 8 digits (Alpaydin & Kaynak 1998), resized to task.resolution,
    stratified train / test split by `data_seed`. Real data, so n_train + n_test <= 1,797."""
    images, labels = vision.digits_images(config.resolution)
    train, test = vision.digits_split(labels, config.n_train, config.n_test, config.data_seed)
    return classification_arrays("digits", images[train], labels[train], images[test], labels[test],
                                 vision.DIGITS_CLASSES, config)


def _indexed_task(config: TaskConfig, data_root: Path, generate: Callable[..., tuple[np.ndarray, np.ndarray]],
                  num_classes: int) -> TaskData:
    """A task whose sample i is a function of (data_seed, i): test = samples 0 .. n_test - 1, train
    the next n_train, so the test set does not change with n_train."""
    def build() -> Arrays:
        x_test, y_test = generate(config.n_test, config.resolution, config.data_seed, start=0)
        x_train, y_train = generate(config.n_train, config.resolution, config.data_seed, start=config.n_test)
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    arrays = cached_arrays(config, data_root, build)
    return classification_arrays(config.name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                                 arrays["y_test"], num_classes, config)


@register_task("spectrogram")
def spectrogram_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Ten classes of synthetic signals as log-power STFT images (see `signals`)."""
    return _indexed_task(config, data_root, signals.generate_spectrograms, len(signals.SIGNAL_CLASSES))


@register_task("grf-texture")
def grf_texture_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Ten classes of Gaussian random fields differing in their (alpha, tau) law (see `textures`)."""
    return _indexed_task(config, data_root, textures.generate_textures, len(textures.GRF_CLASSES))


def _pde_task(config: TaskConfig, data_root: Path) -> TaskData:
    """Operator `task.name` on Darcy's continuous GRF inputs: the first n_train fields train, the
    next n_test test (Darcy's order), inputs (f, x, y), relative L2 on the solution."""
    def build() -> Arrays:
        f, u = pde.generate_pde(config.name, config.n_train + config.n_test, config.resolution, config.data_seed,
                                wavenumber=config.wavenumber, time=config.time)
        return {"f": f, "u": u}

    arrays = cached_arrays(config, data_root, build)
    f, u = torch.from_numpy(arrays["f"]), torch.from_numpy(arrays["u"])
    n = config.n_train
    return field_task(config.name, f[:n], u[:n], f[n:], u[n:], config)


for _operator in pde.OPERATORS:
    register_task(_operator)(_pde_task)
