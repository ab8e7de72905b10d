import numpy as np
import pytest
import scipy.fft

from orca_lora.data import signals, textures


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, n_train: int) -> float:
    classes = np.unique(labels)
    centroids = np.stack([features[:n_train][labels[:n_train] == c].mean(axis=0) for c in classes])
    distances = ((features[n_train:, None] - centroids[None]) ** 2).sum(axis=-1)
    return float(np.mean(classes[distances.argmin(axis=1)] == labels[n_train:]))


@pytest.mark.parametrize("generate", [signals.generate_spectrograms, textures.generate_textures])
def test_samples_depend_on_seed_and_index_only(generate):
    images, labels = generate(20, 16, seed=5)
    tail, tail_labels = generate(8, 16, seed=5, start=12)
    assert images.shape == (20, 1, 16, 16) and images.dtype == np.float32
    assert np.array_equal(images[12:], tail) and np.array_equal(labels[12:], tail_labels)
    assert np.array_equal(np.bincount(labels), [2] * 10)  # class i mod 10
    assert not np.allclose(images, generate(20, 16, seed=6)[0])
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0, atol=1e-4)  # standardised per sample
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_spectrogram_geometry():
    assert signals.signal_length(32) == 62 + 31 * 31
    pure = np.sin(2 * np.pi * 0.25 * np.arange(signals.signal_length(32)))[None]
    image = signals.log_spectrogram(pure, 32)[0]
    assert image.shape == (32, 32)
    assert np.all(image.argmax(axis=0) == 15)  # 0.25 cycles/sample: bin 15.5 of 0..31 from the top


def test_spectrogram_classes_are_told_apart_by_their_mean_image():
    images, labels = signals.generate_spectrograms(400, 16, seed=0)
    assert nearest_centroid_accuracy(images.reshape(400, -1), labels, 300) > 0.5  # chance 0.1


def test_texture_classes_are_told_apart_by_their_power_spectrum():
    """The fields live in a cosine basis (as sampled), so their DCT power falls off as the law says;
    radial averages over log-spaced shells of |k| separate smoothness and correlation length."""
    fields, labels = textures.generate_textures(400, 32, seed=0)
    power = np.log(scipy.fft.dctn(fields[:, 0], axes=(1, 2), norm="ortho") ** 2 + 1e-12)
    shells = np.digitize(np.hypot(*np.meshgrid(np.arange(32), np.arange(32), indexing="ij")), np.geomspace(1, 45, 12))
    profile = np.stack([power[:, shells == shell].mean(axis=1) for shell in np.unique(shells)], axis=1)
    assert nearest_centroid_accuracy(profile, labels, 300) > 0.7  # chance 0.1
