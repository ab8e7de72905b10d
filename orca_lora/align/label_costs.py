"""Label-to-label costs W2^2(P_y, P_y') between class-conditional feature distributions (OTDD's inner problem).

`exact`: OT between the two classes' samples with uniform weights (POT's network simplex);
`gaussian`: Bures-Wasserstein between Gaussians fitted to each class (Alvarez-Melis & Fusi 2020).
"""

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import ot
import torch
from torch import Tensor

from orca_lora.align.features import check_labels, check_pair, squared_distances


@dataclass(frozen=True)
class ClassSplit:
    """One labelled feature set split by class.

    classes[i] is the class index (0..K-1) of sample i, in the order of `names` (sorted labels);
    groups[k] holds the sample indices of class k. For the Gaussian inner cost, `means` (K, d)
    and `roots` (K, r, d) with roots[k]^T roots[k] = covariance of class k (unbiased, n - 1).
    """

    names: Tensor
    classes: Tensor
    groups: tuple[np.ndarray, ...]
    means: Tensor | None = None
    roots: Tensor | None = None

    @property
    def n_classes(self) -> int:
        return len(self.groups)


def split_classes(labels: Tensor) -> ClassSplit:
    """Map arbitrary integer labels to class indices and per-class sample indices."""
    names, classes = torch.unique(labels, return_inverse=True)
    order = np.argsort(classes.cpu().numpy(), kind="stable")
    counts = torch.bincount(classes, minlength=len(names)).cpu().numpy()
    groups = tuple(np.split(order, np.cumsum(counts)[:-1]))
    return ClassSplit(names=names, classes=classes, groups=groups)


def fit_gaussians(x: Tensor, split: ClassSplit) -> ClassSplit:
    """`split` with class means (K, d) and covariance roots (K, r, d), root^T root = cov (ddof=1).

    The root is the thinner of two factors: the centred samples / sqrt(n - 1), zero-padded to
    the largest class (r = n_max), when classes are smaller than the dimension; otherwise the
    symmetric square root of the covariance (r = d, via eigh). Bures only needs R^T R = S.
    """
    sizes = [len(g) for g in split.groups]
    if min(sizes) < 2:
        raise ValueError(f"the gaussian inner cost needs >= 2 samples per class, got sizes {sizes}")
    samples = [x[torch.as_tensor(g, device=x.device)] for g in split.groups]
    means = torch.stack([s.mean(0) for s in samples])
    rows = [(s - s.mean(0)) / (s.shape[0] - 1) ** 0.5 for s in samples]
    n_max, dim = max(sizes), x.shape[1]
    if n_max <= dim:
        roots = x.new_zeros(len(rows), n_max, dim)
        for k, r in enumerate(rows):
            roots[k, : r.shape[0]] = r
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.stack([r.T @ r for r in rows]))
        scaled = eigenvectors * eigenvalues.clamp_min(0.0).sqrt()[:, None, :]
        roots = scaled @ eigenvectors.transpose(1, 2)
    return replace(split, means=means, roots=roots)


def keep_samples(x: Tensor, split: ClassSplit) -> ClassSplit:
    """The exact inner cost works on the samples themselves: nothing to fit."""
    return split


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def exact_label_costs(sq_dist: Tensor, a: ClassSplit, b: ClassSplit) -> Tensor:
    """W2^2 between every class of `a` and every class of `b` by exact OT (POT `ot.emd`).

    W[k, l] = min_P sum P_ij ||x_i - z_j||^2 over couplings of the uniform weights on class k of
    a and class l of b. The plans come from the network simplex on the detached blocks of
    `sq_dist` (one LP per class pair: there is no batched exact solver), gathered into one
    block-structured plan; W = onehot_a^T (plan * sq_dist) onehot_b is then differentiable by
    the envelope theorem. For a self-cost (`b is a`) only pairs k < l are solved: the plan of
    (l, k) is the transpose, and the identity couples a class to itself at zero cost.
    """
    dist = sq_dist.detach().cpu().numpy()
    symmetric = b is a
    plan = torch.zeros_like(sq_dist, device="cpu")
    for k, rows in enumerate(a.groups):
        for l, cols in enumerate(b.groups):
            if symmetric and k >= l:
                continue
            block = np.ix_(rows, cols)
            coupling = ot.emd(_uniform(len(rows)), _uniform(len(cols)), dist[block].astype(float))
            plan[block] = torch.as_tensor(coupling, dtype=plan.dtype)
    if symmetric:
        plan = plan + plan.T
        for rows in a.groups:
            plan[rows, rows] = 1.0 / len(rows)
    onehot_a = torch.nn.functional.one_hot(a.classes, a.n_classes).to(sq_dist.dtype)
    onehot_b = torch.nn.functional.one_hot(b.classes, b.n_classes).to(sq_dist.dtype)
    return onehot_a.T @ (plan.to(sq_dist.device) * sq_dist) @ onehot_b


def gaussian_label_costs(sq_dist: Tensor, a: ClassSplit, b: ClassSplit) -> Tensor:
    """Bures-Wasserstein W2^2 between the Gaussian fits of every class pair:

        ||m1 - m2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)   (Dowson & Landau 1982),

    using tr (S1^1/2 S2 S1^1/2)^1/2 = ||R1 R2^T||_* (nuclear norm) for any roots R^T R = S,
    which needs no matrix square root of rank-deficient target covariances. `sq_dist` (unused)
    keeps the signature shared with `exact_label_costs`.
    """
    fidelity = torch.linalg.svdvals(a.roots[:, None] @ b.roots[None].transpose(-1, -2)).sum(-1)
    trace_a = (a.roots * a.roots).sum((1, 2))
    trace_b = (b.roots * b.roots).sum((1, 2))
    means = squared_distances(a.means, b.means)
    return (means + trace_a[:, None] + trace_b[None, :] - 2.0 * fidelity).clamp_min(0.0)


@dataclass(frozen=True)
class InnerCost:
    """One way to get W2^2 between classes: `fit` adds what `cost` needs to a ClassSplit (once
    per feature set), `cost(sq_dist, a, b)` returns the (K_a, K_b) matrix."""

    fit: Callable[[Tensor, ClassSplit], ClassSplit]
    cost: Callable[[Tensor, ClassSplit, ClassSplit], Tensor]


INNER_COSTS: dict[str, InnerCost] = {
    "exact": InnerCost(keep_samples, exact_label_costs),
    "gaussian": InnerCost(fit_gaussians, gaussian_label_costs),
}


def split_for(inner: str, x: Tensor, labels: Tensor) -> ClassSplit:
    return INNER_COSTS[inner].fit(x, split_classes(labels))


def label_distances(
    x_a: Tensor, y_a: Tensor, x_b: Tensor, y_b: Tensor, inner: str = "exact"
) -> Tensor:
    """Matrix (K_a, K_b) of W2^2 between the classes of (x_a, y_a) and those of (x_b, y_b),
    rows and columns in sorted label order."""
    check_inner(inner)
    check_pair("x_a", x_a, "x_b", x_b)
    check_labels("y_a", y_a, x_a.shape[0])
    check_labels("y_b", y_b, x_b.shape[0])
    a, b = split_for(inner, x_a, y_a), split_for(inner, x_b, y_b)
    return INNER_COSTS[inner].cost(squared_distances(x_a, x_b), a, b)


def check_inner(inner: str) -> None:
    if inner not in INNER_COSTS:
        raise KeyError(f"unknown inner {inner!r}; choose from {sorted(INNER_COSTS)}")
