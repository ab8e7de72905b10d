import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from orca_lora.data.procedural import generate_procedural
from orca_lora.models.features import labelled_target_sample, source_features
from toys import by_hand_patch_embedding, clustered_regression_task, indexed_classification_task


@pytest.fixture(scope="module")
def source() -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural source images at 16 x 16, so every use goes through the resize to the body's 32 x 32."""
    images = generate_procedural(4, 12, image_size=16, seed=0)
    return torch.as_tensor(images.images), torch.as_tensor(images.labels)


def test_source_features_are_the_mean_pooled_patch_embedding_of_resized_images(body, source):
    images = source[0][:10]
    expected = by_hand_patch_embedding(body, images)
    torch.testing.assert_close(source_features(body, images), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(source_features(body, images, batch_size=3), expected,
                               rtol=1e-4, atol=1e-5)
    full_size = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(source_features(body, full_size), expected, rtol=1e-4, atol=1e-5)


def test_labelled_target_sample_keeps_true_labels_for_classification():
    task = indexed_classification_task()
    inputs, labels = labelled_target_sample(task, max_samples=16, n_pseudo_labels=5, seed=0)
    index = inputs[:, 0, 0, 0].long()
    assert inputs.shape == (16, 3, 16, 16) and labels.dtype == torch.long
    assert len(set(index.tolist())) == 16
    assert torch.equal(labels, index % 3)
    again, _ = labelled_target_sample(task, max_samples=16, n_pseudo_labels=5, seed=0)
    other, _ = labelled_target_sample(task, max_samples=16, n_pseudo_labels=5, seed=1)
    assert torch.equal(again, inputs) and not torch.equal(other, inputs)
    everything, _ = labelled_target_sample(task, max_samples=1000, n_pseudo_labels=5, seed=0)
    assert sorted(everything[:, 0, 0, 0].long().tolist()) == list(range(40))


def test_labelled_target_sample_labels_regression_targets_by_k_means_clusters():
    task, clusters = clustered_regression_task()
    inputs, labels = labelled_target_sample(task, max_samples=24, n_pseudo_labels=3, seed=0)
    truth = clusters[inputs[:, 0, 0, 0].long()]
    assert labels.dtype == torch.long and len(labels) == 24
    assert set(labels.tolist()) == {0, 1, 2}
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    _, five = labelled_target_sample(task, max_samples=24, n_pseudo_labels=5, seed=0)
    assert len(set(five.tolist())) == 5
    _, capped = labelled_target_sample(task, max_samples=4, n_pseudo_labels=10, seed=0)
    assert sorted(capped.tolist()) == [0, 1, 2, 3], "more clusters than samples: one cluster per sample"
