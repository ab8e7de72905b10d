import numpy as np
import pytest

from orca_lora.data.procedural import generate_procedural, ifs_system


def test_ifs_system_is_a_contractive_fractal_system():
    for class_id in range(40):
        system = ifs_system(class_id, seed=0)
        n_maps = len(system.probs)
        assert 2 <= n_maps <= 4
        singular = np.linalg.svd(system.linear, compute_uv=False)  # (K, 2), descending
        assert singular.max() < 1
        sigma_factor = np.sum(singular[:, 0] + 2 * singular[:, 1])
        assert (5 + n_maps) / 2 - 1e-9 <= sigma_factor <= (6 + n_maps) / 2 + 1e-9
        det = np.abs(np.linalg.det(system.linear))
        np.testing.assert_allclose(system.probs, det / det.sum(), rtol=1e-12)


def test_ifs_system_depends_on_seed_and_class_only():
    first, again = ifs_system(3, seed=1), ifs_system(3, seed=1)
    np.testing.assert_array_equal(first.linear, again.linear)
    np.testing.assert_array_equal(first.offset, again.offset)
    assert not np.array_equal(first.offset, ifs_system(4, seed=1).offset)
    assert not np.array_equal(first.offset, ifs_system(3, seed=2).offset)
    with pytest.raises(ValueError, match="class_id"):
        ifs_system(-1, seed=0)


def test_shapes_range_and_labels():
    data = generate_procedural(3, 4, image_size=16, seed=0)
    assert data.images.shape == (12, 3, 16, 16) and data.images.dtype == np.float32
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert np.all(data.images.reshape(12, -1).max(axis=1) > 0.2)  # no blank image
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(3), 4))
    assert data.labels.dtype == np.int64


def test_each_image_is_one_colour_times_an_intensity():
    images = generate_procedural(2, 3, image_size=16, seed=0).images
    for image in images:
        brightest = np.unravel_index(image.max(axis=0).argmax(), image.shape[1:])
        colour = image[:, brightest[0], brightest[1]]
        intensity = image.max(axis=0) / colour.max()
        np.testing.assert_allclose(image, colour[:, None, None] * intensity[None], atol=1e-6)


def test_deterministic_in_the_seed():
    first = generate_procedural(2, 3, image_size=16, seed=5)
    np.testing.assert_array_equal(first.images, generate_procedural(2, 3, image_size=16, seed=5).images)
    assert not np.array_equal(first.images, generate_procedural(2, 3, image_size=16, seed=6).images)


def test_images_vary_within_a_class():
    images = generate_procedural(1, 4, image_size=16, seed=0).images
    intensities = images.max(axis=1)
    assert all(not np.array_equal(intensities[0], other) for other in intensities[1:])


def test_class_images_do_not_depend_on_the_number_of_classes():
    five = generate_procedural(5, 3, image_size=16, seed=0)
    ten = generate_procedural(10, 3, image_size=16, seed=0)
    np.testing.assert_array_equal(five.images[five.labels == 3], ten.images[ten.labels == 3])


def test_class_offset_selects_later_systems_with_labels_from_zero():
    source = generate_procedural(5, 3, image_size=16, seed=0)
    held_out = generate_procedural(2, 3, image_size=16, seed=0, class_offset=3)
    np.testing.assert_array_equal(held_out.labels, np.repeat([0, 1], 3))
    np.testing.assert_array_equal(held_out.images, source.images[source.labels >= 3])


def test_sample_offset_gives_fresh_images_of_the_same_classes():
    six = generate_procedural(2, 6, image_size=16, seed=0)
    later = generate_procedural(2, 3, image_size=16, seed=0, sample_offset=3)
    np.testing.assert_array_equal(later.images, six.images[np.arange(12) % 6 >= 3])
    np.testing.assert_array_equal(later.labels, np.repeat([0, 1], 3))


def test_held_out_classes_differ_from_source_classes():
    source = generate_procedural(5, 3, image_size=16, seed=0)
    held_out = generate_procedural(5, 3, image_size=16, seed=0, class_offset=5)
    for image in held_out.images:
        assert not any(np.array_equal(image, other) for other in source.images)
    assert all(not np.array_equal(ifs_system(5 + k, 0).offset, ifs_system(k, 0).offset) for k in range(5))


def test_nearest_class_mean_is_clearly_above_chance():
    n_classes, per_class, n_fit = 10, 30, 20
    data = generate_procedural(n_classes, per_class, image_size=32, seed=0)
    # Colour is drawn per image, independently of the class: compare intensities.
    features = data.images.max(axis=1).reshape(len(data.labels), -1)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    fit = np.arange(len(data.labels)) % per_class < n_fit
    means = np.stack([features[fit & (data.labels == c)].mean(axis=0) for c in range(n_classes)])
    distances = ((features[~fit, None] - means[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == data.labels[~fit]).mean()
    assert accuracy > 0.5  # chance is 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_classes": 0, "samples_per_class": 1}, "n_classes"),
        ({"n_classes": 1, "samples_per_class": 0}, "samples_per_class"),
        ({"n_classes": 1, "samples_per_class": 1, "image_size": 2}, "image_size"),
        ({"n_classes": 1, "samples_per_class": 1, "class_offset": -1}, "class_offset"),
        ({"n_classes": 1, "samples_per_class": 1, "sample_offset": -1}, "sample_offset"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_procedural(**kwargs)
