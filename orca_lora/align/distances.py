"""Distances between a source and a target feature set: MMD, OTDD, a C2ST gap, a spectral rank.

Stage 1 trains the embedder on a differentiable distance (`mmd`, `otdd`); stage 2 measures the
modality gap per body block with any of them (`c2st` too). Every entry of `DISTANCES` takes
`(x_s, y_s, x_t, y_t, **options)`: features (n, d) and labels (n,) of source and target.

OTDD here is the label-aware OT dataset distance of Alvarez-Melis & Fusi (2020), "Geometric dataset
distances via optimal transport": points are (x, y) pairs with ground cost
    c((x, y), (x', y')) = ||x - x'||^2 + W2^2(P_y, P_y'),
P_y the features of class y in its own dataset. The outer problem is entropic OT (eps-scaled
log-domain Sinkhorn, `orca_lora.align.sinkhorn`), the inner W2^2 exact (POT network simplex) or
Bures-Wasserstein between fitted Gaussians. Everything that depends only on the source is
computed once by `prepare_source` and reused every step.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from orca_lora.align.features import check_features, check_labels, check_pair, squared_distances
from orca_lora.align.label_costs import INNER_COSTS, ClassSplit, check_inner, split_for
from orca_lora.align.sinkhorn import (
    SINKHORN_MAX_ITERS,
    SINKHORN_TOLERANCE,
    check_sinkhorn_options,
    entropic_ot,
)
from orca_lora.choices import DISTANCES as DISTANCE_NAMES
from orca_lora.choices import check_registry
from orca_lora.rank.spectral import spectral_shift_rank

MEDIAN_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


# ---------------------------------------------------------------------------------------------
# MMD


def median_bandwidths(x: Tensor, y: Tensor, multipliers=MEDIAN_MULTIPLIERS) -> Tensor:
    """Median heuristic: median pairwise distance of the pooled sample times `multipliers`.

    The multipliers (0.25, 0.5, 1, 2, 4) cover scales below and above the median so that the
    sum of kernels stays sensitive when the two samples differ at a finer or coarser scale
    (Gretton et al. 2012, section 8). Computed without gradient.
    """
    with torch.no_grad():
        pooled = torch.cat([x, y]).detach()
        distances = squared_distances(pooled, pooled).sqrt()
        upper = torch.ones_like(distances, dtype=torch.bool).triu(1)
        median = distances[upper].median()
    if median <= 0:
        raise ValueError("median pairwise distance is 0 (duplicate points); pass bandwidths=")
    return median * torch.tensor(multipliers, dtype=x.dtype, device=x.device)


def gaussian_kernel(sq_dist: Tensor, bandwidths: Tensor) -> Tensor:
    """k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) from squared distances."""
    return sum(torch.exp(-sq_dist / (2.0 * s * s)) for s in bandwidths)


KERNELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"gaussian": gaussian_kernel}


def mmd2(x: Tensor, y: Tensor, kernel: str = "gaussian", bandwidths=None) -> Tensor:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d); Gretton et al. (2012), eq. 3:

        MMD_u^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(mn) sum_{i, j} k(x_i, y_j)

    with the sum-of-Gaussians kernel; `bandwidths` default to `median_bandwidths(x, y)`.
    Differentiable in x and y; it can be slightly negative when the samples match.
    """
    check_pair("x", x, "y", y)
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; choose from {sorted(KERNELS)}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"mmd2 needs at least 2 samples in x and y, got {m} and {n}")
    if bandwidths is None:
        bandwidths = median_bandwidths(x, y)
    bandwidths = torch.as_tensor(bandwidths, dtype=x.dtype, device=x.device).reshape(-1)
    if bandwidths.numel() == 0 or bool((bandwidths <= 0).any()):
        raise ValueError(f"bandwidths must be positive, got {bandwidths.tolist()}")
    k = KERNELS[kernel]
    # The diagonal k(a, a) = len(bandwidths) for every point; remove it instead of masking.
    self_similarity = bandwidths.numel()
    kxx = (k(squared_distances(x, x), bandwidths).sum() - m * self_similarity) / (m * (m - 1))
    kyy = (k(squared_distances(y, y), bandwidths).sum() - n * self_similarity) / (n * (n - 1))
    kxy = k(squared_distances(x, y), bandwidths).mean()
    return kxx + kyy - 2.0 * kxy


def _augmented_cost(x: Tensor, a: ClassSplit, z: Tensor, b: ClassSplit, inner: str) -> Tensor:
    """Cost ||x_i - z_j||^2 + W2^2(P_{y_i}, P_{y'_j}) between all points of two labelled sets."""
    sq_dist = squared_distances(x, z)
    label_costs = INNER_COSTS[inner].cost(sq_dist, a, b)
    return sq_dist + label_costs[a.classes][:, b.classes]


@dataclass(frozen=True)
class SourceOTDDCache:
    """Everything OTDD needs from the source alone, computed once by `prepare_source`.

    `self_ot` is OT_eps(source, source) on the augmented cost (the source half of the debiasing
    term); None when built with debiased=False.
    """

    features: Tensor
    labels: Tensor
    split: ClassSplit
    inner: str
    entropic_reg: float
    sinkhorn_tolerance: float
    sinkhorn_max_iters: int
    self_ot: Tensor | None

    def check_matches(self, x_s: Tensor, y_s: Tensor, inner: str, entropic_reg: float,
                      debiased: bool, sinkhorn_tolerance: float, sinkhorn_max_iters: int) -> None:
        settings = (inner, float(entropic_reg), float(sinkhorn_tolerance), int(sinkhorn_max_iters),
                    debiased)
        built = (self.inner, self.entropic_reg, self.sinkhorn_tolerance, self.sinkhorn_max_iters,
                 self.self_ot is not None)
        if settings != built:
            raise ValueError(
                "source cache built for (inner, entropic_reg, sinkhorn_tolerance, sinkhorn_max_iters, "
                f"debiased)={built}, "
                f"called with {settings}; rebuild it with prepare_source"
            )
        if not (torch.equal(x_s.detach(), self.features) and torch.equal(y_s, self.labels)):
            raise ValueError("source cache built from other x_s / y_s; rebuild with prepare_source")


def prepare_source(
    x_s: Tensor,
    y_s: Tensor,
    inner: str = "exact",
    entropic_reg: float = 0.1,
    debiased: bool = True,
    sinkhorn_tolerance: float = SINKHORN_TOLERANCE,
    sinkhorn_max_iters: int = SINKHORN_MAX_ITERS,
) -> SourceOTDDCache:
    """Precompute the source side of `otdd`: class split (and Gaussian fits), and with
    debiasing OT_eps(source, source) on the source-source augmented cost (n_s x n_s)."""
    _check_otdd_options(inner, entropic_reg, sinkhorn_tolerance, sinkhorn_max_iters)
    check_features("x_s", x_s)
    check_labels("y_s", y_s, x_s.shape[0])
    features = x_s.detach()
    split = split_for(inner, features, y_s)
    self_ot = None
    if debiased:
        with torch.no_grad():
            cost = _augmented_cost(features, split, features, split, inner)
            self_ot = entropic_ot(cost, entropic_reg, sinkhorn_tolerance, sinkhorn_max_iters,
                                  symmetric=True)
    return SourceOTDDCache(
        features, y_s, split, inner, float(entropic_reg), float(sinkhorn_tolerance),
        int(sinkhorn_max_iters), self_ot
    )


def _check_otdd_options(inner: str, entropic_reg: float, sinkhorn_tolerance: float,
                        sinkhorn_max_iters: int) -> None:
    check_inner(inner)
    if not entropic_reg > 0:
        raise ValueError(f"entropic_reg must be > 0, got {entropic_reg}")
    check_sinkhorn_options(sinkhorn_tolerance, sinkhorn_max_iters)


def otdd(
    x_s: Tensor,
    y_s: Tensor,
    x_t: Tensor,
    y_t: Tensor,
    inner: str = "exact",
    entropic_reg: float = 0.1,
    debiased: bool = True,
    sinkhorn_tolerance: float = SINKHORN_TOLERANCE,
    sinkhorn_max_iters: int = SINKHORN_MAX_ITERS,
    source: SourceOTDDCache | None = None,
) -> Tensor:
    """Label-aware OT dataset distance (Alvarez-Melis & Fusi 2020), differentiable in x_t.

    Cost between (x, y) in the source and (x', y') in the target: ||x - x'||^2 + W2^2(P_y, P_y'),
    W2^2 from `inner` ("exact" OT between the two classes' samples, or "gaussian" Bures).
    Value: OT_eps(a, b) with eps = `entropic_reg` (see `entropic_ot`); with `debiased`, the
    Sinkhorn divergence OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2 (Feydy et al. 2019).
    The source is a constant: pass `source=prepare_source(x_s, y_s, ...)` to reuse its side
    across calls. Gradients reach x_t through the plans (envelope theorem), not the solvers.
    """
    _check_otdd_options(inner, entropic_reg, sinkhorn_tolerance, sinkhorn_max_iters)
    check_pair("x_s", x_s, "x_t", x_t)
    check_labels("y_s", y_s, x_s.shape[0])
    check_labels("y_t", y_t, x_t.shape[0])
    tolerance, max_iters = sinkhorn_tolerance, sinkhorn_max_iters
    if source is None:
        source = prepare_source(x_s, y_s, inner, entropic_reg, debiased, tolerance, max_iters)
    else:
        source.check_matches(x_s, y_s, inner, entropic_reg, debiased, tolerance, max_iters)
    target = split_for(inner, x_t, y_t)
    cross = _augmented_cost(source.features, source.split, x_t, target, inner)
    value = entropic_ot(cross, entropic_reg, tolerance, max_iters)
    if not debiased:
        return value
    self_target = _augmented_cost(x_t, target, x_t, target, inner)
    self_ot = entropic_ot(self_target, entropic_reg, tolerance, max_iters, symmetric=True)
    return value - 0.5 * (source.self_ot + self_ot)


# ---------------------------------------------------------------------------------------------
# C2ST


def c2st_gap(x: Tensor, y: Tensor, folds: int = 5, seed: int = 0) -> float:
    """Classifier two-sample test gap 2 |acc - 1/2| (Lopez-Paz & Oquab 2017).

    acc is the stratified `folds`-fold cross-validated balanced accuracy of a standardised
    logistic regression telling x (source) from y (target); balanced accuracy keeps chance at
    1/2 when the samples differ in size. 0: indistinguishable, 1: perfectly separable.
    """
    check_pair("x", x, "y", y)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if min(x.shape[0], y.shape[0]) < folds:
        raise ValueError(
            f"c2st_gap needs >= folds={folds} samples in x and y, got {x.shape[0]} and {y.shape[0]}"
        )
    features = torch.cat([x, y]).detach().cpu().double().numpy()
    is_target = np.r_[np.zeros(x.shape[0], dtype=int), np.ones(y.shape[0], dtype=int)]
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced")
    )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(
        classifier, features, is_target, cv=splitter, scoring="balanced_accuracy"
    )
    return float(2.0 * abs(scores.mean() - 0.5))


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Distance:
    """A registered distance: `fn(x_s, y_s, x_t, y_t, **options)`; only differentiable ones
    (returning a tensor with gradient in x_t) may serve as the stage-1 loss."""

    name: str
    fn: Callable[..., Tensor | float]
    differentiable: bool


DISTANCES: dict[str, Distance] = {}


def register_distance(name: str, differentiable: bool):
    def decorator(fn):
        if name in DISTANCES:
            raise KeyError(f"distance {name!r} is already registered")
        DISTANCES[name] = Distance(name, fn, differentiable)
        return fn

    return decorator


def get_distance(name: str) -> Distance:
    check_registry("distance", DISTANCES, DISTANCE_NAMES)
    if name not in DISTANCES:
        raise KeyError(f"unknown distance {name!r}; choose from {sorted(DISTANCES)}")
    return DISTANCES[name]


@register_distance("mmd", differentiable=True)
def _mmd_distance(x_s: Tensor, y_s: Tensor, x_t: Tensor, y_t: Tensor, **options) -> Tensor:
    return mmd2(x_s, x_t, **options)


@register_distance("otdd", differentiable=True)
def _otdd_distance(x_s: Tensor, y_s: Tensor, x_t: Tensor, y_t: Tensor, **options) -> Tensor:
    return otdd(x_s, y_s, x_t, y_t, **options)


@register_distance("c2st", differentiable=False)
def _c2st_distance(x_s: Tensor, y_s: Tensor, x_t: Tensor, y_t: Tensor, **options) -> float:
    return c2st_gap(x_s, x_t, **options)


@register_distance("spectral", differentiable=False)
def _spectral_distance(x_s: Tensor, y_s: Tensor, x_t: Tensor, y_t: Tensor, **options) -> float:
    """The shift's dimension in rank units (`orca_lora.rank.spectral`); labels unused."""
    return float(spectral_shift_rank(x_s, x_t, **options).rank)


def distance_options(distance: str, otdd_inner: str, entropic_reg: float, seed: int,
                     sinkhorn_tolerance: float = SINKHORN_TOLERANCE,
                     sinkhorn_max_iters: int = SINKHORN_MAX_ITERS) -> dict:
    """The keyword options each registered distance takes, from the values a config section sets."""
    otdd_options = {"inner": otdd_inner, "entropic_reg": entropic_reg,
                    "sinkhorn_tolerance": sinkhorn_tolerance, "sinkhorn_max_iters": sinkhorn_max_iters}
    return {"otdd": otdd_options, "c2st": {"seed": seed}}.get(distance, {})
