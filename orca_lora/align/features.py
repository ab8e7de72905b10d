"""Shared checks and geometry for labelled feature sets (n, d) with labels (n,)."""

from torch import Tensor


def check_features(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (n_samples, n_features), got {shape}")


def check_pair(name_x: str, x: Tensor, name_y: str, y: Tensor) -> None:
    check_features(name_x, x)
    check_features(name_y, y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same feature dim, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise ValueError(f"{name_x} and {name_y} must share a dtype, got {x.dtype} and {y.dtype}")


def check_labels(name: str, labels: Tensor, n_samples: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n_samples:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {n_samples} labels, got {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise ||x_i - y_j||^2 as ||x||^2 + ||y||^2 - 2 x.y (clamped at 0), shape (n, m)."""
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return sq.clamp_min(0.0)
