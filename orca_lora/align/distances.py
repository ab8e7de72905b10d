"""Distances between a source and a target feature set: MMD, OTDD and a C2ST gap.

Stage 1 trains the embedder on a differentiable distance (`mmd`, `otdd`); stage 2 measures the
modality gap per body block with any of them (`c2st` too). Every entry of `DISTANCES` takes
`(x_s, y_s, x_t, y_t, **options)`: features (n, d) and labels (n,) of source and target.

OTDD here is the label-aware OT dataset distance of Alvarez-Melis & Fusi (2020), "Geometric dataset
distances via optimal transport": points are (x, y) pairs with ground cost
    c((x, y), (x', y')) = ||x - x'||^2 + W2^2(P_y, P_y'),
P_y the features of class y in its own dataset. The outer problem is entropic OT (annealed
Sinkhorn on geomloss' schedule), the inner W2^2 exact (POT network simplex) or Bures-Wasserstein
between fitted Gaussians. Everything that depends only on the source is computed once by
`prepare_source` and reused every step.
"""

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import ot
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

MEDIAN_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
SINKHORN_ITERS = 50


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_features(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (n_samples, n_features), got {shape}")


def _check_pair(name_x: str, x: Tensor, name_y: str, y: Tensor) -> None:
    _check_features(name_x, x)
    _check_features(name_y, y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same feature dim, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise ValueError(f"{name_x} and {name_y} must share a dtype, got {x.dtype} and {y.dtype}")


def _check_labels(name: str, labels: Tensor, n_samples: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n_samples:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {n_samples} labels, got {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise ||x_i - y_j||^2 as ||x||^2 + ||y||^2 - 2 x.y (clamped at 0), shape (n, m)."""
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return sq.clamp_min(0.0)


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
    _check_pair("x", x, "y", y)
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


# ---------------------------------------------------------------------------------------------
# OTDD: classes and their label-to-label costs


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


def _split_for(inner: str, x: Tensor, labels: Tensor) -> ClassSplit:
    return INNER_COSTS[inner].fit(x, split_classes(labels))


def label_distances(
    x_a: Tensor, y_a: Tensor, x_b: Tensor, y_b: Tensor, inner: str = "exact"
) -> Tensor:
    """Matrix (K_a, K_b) of W2^2 between the classes of (x_a, y_a) and those of (x_b, y_b),
    rows and columns in sorted label order."""
    _check_inner(inner)
    _check_pair("x_a", x_a, "x_b", x_b)
    _check_labels("y_a", y_a, x_a.shape[0])
    _check_labels("y_b", y_b, x_b.shape[0])
    a, b = _split_for(inner, x_a, y_a), _split_for(inner, x_b, y_b)
    return INNER_COSTS[inner].cost(squared_distances(x_a, x_b), a, b)


def _check_inner(inner: str) -> None:
    if inner not in INNER_COSTS:
        raise KeyError(f"unknown inner {inner!r}; choose from {sorted(INNER_COSTS)}")


# ---------------------------------------------------------------------------------------------
# OTDD: outer entropic problem


def _with_gradient(value: Tensor, inputs: Tensor, gradient: Tensor) -> Tensor:
    """`value` as a function of `inputs` whose derivative is `gradient`."""
    return value.detach() + (gradient.detach() * (inputs - inputs.detach())).sum()


def _softmin(eps: float, cost: Tensor, log_weights: Tensor, potential: Tensor, dim: int) -> Tensor:
    """Soft c-transform -eps log sum_k w_k exp((p_k - C_ik) / eps), summing over `dim` of cost.

    Terms more than e^-50 below the largest are raised to e^-50, a change far below float
    precision; without it most terms underflow at small eps, and torch.exp on CPU runs its
    underflow path some 40x slower per element.
    """
    shift = (potential / eps + log_weights).unsqueeze(1 - dim)
    scores = torch.sub(shift, cost, alpha=1.0 / eps)
    top = scores.amax(dim, keepdim=True)
    total = (scores - top).clamp_min_(-50.0).exp_().sum(dim)
    return -eps * (top.squeeze(dim) + total.log())


def _self_potential(cost: Tensor, eps: float, iters: int, log_a: Tensor) -> Tensor:
    """Potential f = g of a self-transport OT_eps(a, a) (C = C^T): the averaged symmetric update
    f <- (f + T(f)) / 2 of Feydy et al. (2019) at eps, stopped once it moves by < 1e-6 of its
    scale. Without annealing it settles in a few iterations (to 1e-8 within 11 on every cost
    tried, Darcy setting included), where the two-potential loop needs its full schedule."""
    a = log_a.exp()
    f = cost @ a
    f = f - 0.5 * (a @ f)
    for _ in range(iters):
        f_new = 0.5 * (f + _softmin(eps, cost, log_a, f, dim=1))
        done = float((f_new - f).abs().max()) <= 1e-6 * (float(f.abs().max()) + eps)
        f = f_new
        if done:
            break
    return _softmin(eps, cost, log_a, f, dim=1)


def _sinkhorn_potentials(
    cost: Tensor, eps: float, iters: int, log_a: Tensor, log_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Dual potentials (f, g) of OT_eps(a, b).

    First half of `iters`: Feydy's annealed symmetric Sinkhorn (2020, Alg. 3.5) on the schedule
    of `geomloss.ot.solve` (eps from the cost range down geometrically, averaged updates of f
    and g). Second half: alternating Sinkhorn updates at the target eps, which converge there
    far faster than more annealing. Then one last parallel update, as geomloss does.
    """
    a, b = log_a.exp(), log_b.exp()
    # eps = +inf solution, as geomloss starts: f_i = <b, C_i.> - <a, C b> / 2.
    f, g = cost @ b, a @ cost
    f, g = f - 0.5 * (a @ f), g - 0.5 * (b @ g)
    n_anneal = (iters + 1) // 2
    start = max(float(cost.max() - cost.min()), eps)
    for eps_k in np.geomspace(start, eps, n_anneal) if n_anneal > 1 else [eps]:
        f_new = _softmin(float(eps_k), cost, log_b, g, dim=1)
        g_new = _softmin(float(eps_k), cost, log_a, f, dim=0)
        f, g = 0.5 * (f + f_new), 0.5 * (g + g_new)
    for _ in range(iters - n_anneal):
        f = _softmin(eps, cost, log_b, g, dim=1)
        g = _softmin(eps, cost, log_a, f, dim=0)
    return _softmin(eps, cost, log_b, g, dim=1), _softmin(eps, cost, log_a, f, dim=0)


def entropic_ot(
    cost: Tensor, entropic_reg: float, sinkhorn_iters: int = SINKHORN_ITERS, symmetric: bool = False
) -> Tensor:
    """OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b) over couplings of uniform weights a, b.

    eps = `entropic_reg`, in the units of the cost, which in `otdd` is the full squared distance
    ||x - x'||^2 + W2^2. geomloss conversion: SamplesLoss(p=2, blur=s, cost=|x - y|^2) has
    eps = s^2; with its default halved cost |x - y|^2 / 2 (also otdd's p=2 routine),
    SamplesLoss(blur=s) = OT_{2 s^2}(C) / 2 in these units. Solved in `sinkhorn_iters`
    log-domain Sinkhorn iterations (`_sinkhorn_potentials`); the value is the dual
    <a, f> + <b, g>. `symmetric` marks a self-transport cost (C = C^T, a = b), solved by
    `_self_potential` in at most `sinkhorn_iters` iterations. No gradient through the loop:
    the gradient in `cost` is the plan a_i b_j exp((f_i + g_j - C_ij) / eps) (envelope
    theorem). Not geomloss.ot.solve: in geomloss 0.3.1 its `.value` backpropagates twice the
    plan, and its softmin runs torch.exp's slow underflow path.
    """
    with torch.no_grad():
        c = cost.detach()
        log_a, log_b = (torch.full((k,), -math.log(k), dtype=c.dtype, device=c.device)
                        for k in c.shape)
        if symmetric:
            f = g = _self_potential(c, entropic_reg, sinkhorn_iters, log_a)
        else:
            f, g = _sinkhorn_potentials(c, entropic_reg, sinkhorn_iters, log_a, log_b)
        value = log_a.exp() @ f + log_b.exp() @ g
        if not cost.requires_grad:
            return value
        # Density clamped at e^-50 like `_softmin`: negligible, and it keeps torch.exp fast.
        density = ((f[:, None] + g[None, :] - c) / entropic_reg).clamp_min_(-50.0).exp_()
        plan = density * (log_a.exp()[:, None] * log_b.exp()[None, :])
    return _with_gradient(value, cost, plan)


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
    sinkhorn_iters: int
    self_ot: Tensor | None

    def check_matches(self, x_s: Tensor, y_s: Tensor, inner: str, entropic_reg: float,
                      debiased: bool, sinkhorn_iters: int) -> None:
        settings = (inner, float(entropic_reg), sinkhorn_iters, debiased)
        built = (self.inner, self.entropic_reg, self.sinkhorn_iters, self.self_ot is not None)
        if settings != built:
            raise ValueError(
                f"source cache built for (inner, entropic_reg, sinkhorn_iters, debiased)={built}, "
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
    sinkhorn_iters: int = SINKHORN_ITERS,
) -> SourceOTDDCache:
    """Precompute the source side of `otdd`: class split (and Gaussian fits), and with
    debiasing OT_eps(source, source) on the source-source augmented cost (n_s x n_s)."""
    _check_otdd_options(inner, entropic_reg, sinkhorn_iters)
    _check_features("x_s", x_s)
    _check_labels("y_s", y_s, x_s.shape[0])
    features = x_s.detach()
    split = _split_for(inner, features, y_s)
    self_ot = None
    if debiased:
        with torch.no_grad():
            cost = _augmented_cost(features, split, features, split, inner)
            self_ot = entropic_ot(cost, entropic_reg, sinkhorn_iters, symmetric=True)
    return SourceOTDDCache(
        features, y_s, split, inner, float(entropic_reg), sinkhorn_iters, self_ot
    )


def _check_otdd_options(inner: str, entropic_reg: float, sinkhorn_iters: int) -> None:
    _check_inner(inner)
    if not entropic_reg > 0:
        raise ValueError(f"entropic_reg must be > 0, got {entropic_reg}")
    if sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")


def otdd(
    x_s: Tensor,
    y_s: Tensor,
    x_t: Tensor,
    y_t: Tensor,
    inner: str = "exact",
    entropic_reg: float = 0.1,
    debiased: bool = True,
    sinkhorn_iters: int = SINKHORN_ITERS,
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
    _check_otdd_options(inner, entropic_reg, sinkhorn_iters)
    _check_pair("x_s", x_s, "x_t", x_t)
    _check_labels("y_s", y_s, x_s.shape[0])
    _check_labels("y_t", y_t, x_t.shape[0])
    if source is None:
        source = prepare_source(x_s, y_s, inner, entropic_reg, debiased, sinkhorn_iters)
    else:
        source.check_matches(x_s, y_s, inner, entropic_reg, debiased, sinkhorn_iters)
    target = _split_for(inner, x_t, y_t)
    cross = _augmented_cost(source.features, source.split, x_t, target, inner)
    value = entropic_ot(cross, entropic_reg, sinkhorn_iters)
    if not debiased:
        return value
    self_target = _augmented_cost(x_t, target, x_t, target, inner)
    self_ot = entropic_ot(self_target, entropic_reg, sinkhorn_iters, symmetric=True)
    return value - 0.5 * (source.self_ot + self_ot)


# ---------------------------------------------------------------------------------------------
# C2ST


def c2st_gap(x: Tensor, y: Tensor, folds: int = 5, seed: int = 0) -> float:
    """Classifier two-sample test gap 2 |acc - 1/2| (Lopez-Paz & Oquab 2017).

    acc is the stratified `folds`-fold cross-validated balanced accuracy of a standardised
    logistic regression telling x (source) from y (target); balanced accuracy keeps chance at
    1/2 when the samples differ in size. 0: indistinguishable, 1: perfectly separable.
    """
    _check_pair("x", x, "y", y)
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
