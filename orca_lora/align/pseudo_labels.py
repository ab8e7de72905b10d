"""Pseudo-labels for unlabelled (regression) targets, as ORCA does before its OTDD loss:
k-means on the target features, each cluster a class."""

import torch
from sklearn.cluster import KMeans
from torch import Tensor

N_INIT = 10


def kmeans_labels(x: Tensor, n_clusters: int = 10, seed: int = 0) -> Tensor:
    """Cluster index (0..n_clusters-1) of every row of x (n, d), by scikit-learn KMeans
    (k-means++, N_INIT restarts, best inertia kept), deterministic given `seed`."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D tensor (n_samples, n_features), got {shape}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if x.shape[0] < n_clusters:
        raise ValueError(
            f"kmeans_labels needs at least n_clusters={n_clusters} samples, got {x.shape[0]}; "
            "lower n_clusters or pass more samples"
        )
    features = x.detach().cpu().double().numpy()
    model = KMeans(n_clusters=n_clusters, n_init=N_INIT, random_state=seed)
    return torch.as_tensor(model.fit_predict(features), dtype=torch.long, device=x.device)
