import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from orca_lora.align.pseudo_labels import kmeans_labels


def planted_clusters(n_per_cluster=30, n_clusters=4, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 20.0 * torch.randn(n_clusters, dim, generator=g)
    truth = torch.arange(n_clusters).repeat_interleave(n_per_cluster)
    x = centres[truth] + torch.randn(len(truth), dim, generator=g)
    order = torch.randperm(len(truth), generator=g)
    return x[order], truth[order]


def test_recovers_planted_clusters_up_to_relabeling():
    x, truth = planted_clusters()
    labels = kmeans_labels(x, n_clusters=4, seed=0)
    assert labels.dtype == torch.long and labels.shape == truth.shape
    assert set(labels.tolist()) == {0, 1, 2, 3}
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    # One-to-one relabeling: every true cluster maps to exactly one found cluster.
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4


def test_deterministic_given_seed():
    x, _ = planted_clusters(n_clusters=6, dim=3, seed=1)
    x = x + 15.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    first = kmeans_labels(x, n_clusters=5, seed=3)
    assert torch.equal(first, kmeans_labels(x, n_clusters=5, seed=3))
    assert np.array_equal(first.numpy(), kmeans_labels(x.clone(), n_clusters=5, seed=3).numpy())


@pytest.mark.parametrize(
    "x, n_clusters, match",
    [
        (torch.randn(5, 2), 10, "at least n_clusters=10"),
        (torch.randn(20), 3, "2-D"),
        (torch.randn(20, 2), 0, "n_clusters must be >= 1"),
    ],
)
def test_rejects_bad_input(x, n_clusters, match):
    with pytest.raises(ValueError, match=match):
        kmeans_labels(x, n_clusters=n_clusters)
