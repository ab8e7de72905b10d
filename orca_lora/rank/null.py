"""A gap with its noise floor, p-value and interval: each stage-2 distance against its own null.

Every estimator takes one block's source and target features, already in the source's units
(`gap.SourceUnits`), and returns a `GapEstimate`:

- `mmd`: D = MMD^2_u(source, target) x m0^2 with the kernel bandwidths fixed from source-source
  distances (m0 their median). At a fixed Mahalanobis mean shift, MMD^2 with median-scaled
  bandwidths falls roughly as 1 / width (a Gaussian kernel of bandwidth ~ sqrt(2 width) sees a
  shift delta as delta^2 / (4 width)), so the factor m0^2 ~ 2 width puts blocks of different
  widths on one scale (tested on synthetic Gaussians). Null: label permutations of the pooled
  sample (Gretton et al. 2012, sec. 5), all computed from one pooled kernel matrix as quadratic
  forms; interval: bootstrap over samples with the self-pairs of repeated points left out of the
  U-statistic. Negative estimates are kept as measured.
- `otdd`: the debiased OTDD (Alvarez-Melis & Fusi 2020) between half samples, reported minus the
  mean of its null, OTDD between two disjoint halves of the source (its bias grows with width:
  113 at width 48 against 615 at 192 for n = 256 in one trial). The measured value is the mean
  over the draws, the floor a quantile of single draws, so the test is conservative; interval
  from the draws (a subsampling interval, not a bootstrap).
- `c2st`: 2 |acc - 1/2| of a cross-validated classifier (Lopez-Paz & Oquab 2017) against the
  binomial null of its held-out accuracy, acc ~ Bin(N, 1/2) / N; interval: Clopper-Pearson on acc.
- `spectral`: the rank of the shift (`rank/spectral.py`) against the same label permutations and
  bootstrap as `mmd`, every draw's two covariances from one batched weighted sum and its
  generalised eigenvalues from one batched Cholesky and eigvalsh.
- any other registered distance: the same permutation null and bootstrap, one call of the
  distance per draw.

The floor is the null's 95% quantile at the gap's own sample sizes; `corrected_gap` is what every
consumer of a gap uses: max(D - floor, 0), and 0 whenever p >= 0.05 (at the floor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from orca_lora.align.distances import c2st_gap, gaussian_kernel, otdd
from orca_lora.align.features import squared_distances
from orca_lora.rank.spectral import CalibrationStore, resampled_spectral_ranks, spectral_shift_rank

FLOOR_QUANTILE = 0.95
SIGNIFICANCE = 0.05
INTERVAL = 0.95


@dataclass(frozen=True)
class GapEstimate:
    gap: float  # D as measured (negative MMD^2_u kept)
    floor: float  # the null's 95% quantile, in the gap's units
    p_value: float  # one-sided, against the null
    ci_low: float
    ci_high: float


def corrected_gap(estimate: GapEstimate) -> float:
    """max(D - floor, 0), and 0 when the gap is not significant (p >= 0.05)."""
    if estimate.p_value >= SIGNIFICANCE:
        return 0.0
    return max(estimate.gap - estimate.floor, 0.0)


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (1 + B): exact for B random permutations (Phipson & Smyth 2010)."""
    return float((1 + np.sum(null >= observed)) / (1 + len(null)))


def _interval(draws: np.ndarray) -> tuple[float, float]:
    tail = (1 - INTERVAL) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def _membership(n_source: int, n_target: int, draws: int, generator: torch.Generator) -> Tensor:
    """(draws, N) 0/1 rows marking which of the pooled N points each permutation calls source."""
    order = torch.stack([torch.randperm(n_source + n_target, generator=generator) for _ in range(draws)])
    member = torch.zeros(draws, n_source + n_target, dtype=torch.float64)
    member.scatter_(1, order[:, :n_source], 1.0)
    return member


def _bootstrap_counts(n_source: int, n_target: int, draws: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(draws, N) counts of each pooled point in a bootstrap resample of the source (its first
    n_source points) and, apart, of the target (the rest)."""
    counts_s = torch.zeros(draws, n_source + n_target, dtype=torch.float64)
    counts_t = torch.zeros_like(counts_s)
    ones = torch.ones(draws, max(n_source, n_target), dtype=torch.float64)
    counts_s.scatter_add_(1, torch.randint(0, n_source, (draws, n_source), generator=generator), ones[:, :n_source])
    counts_t.scatter_add_(1, n_source + torch.randint(0, n_target, (draws, n_target), generator=generator),
                          ones[:, :n_target])
    return counts_s, counts_t


def weighted_mmd2(kernel: Tensor, source_weights: Tensor, target_weights: Tensor) -> Tensor:
    """MMD^2_u for many weightings of one pooled kernel matrix K (N x N, constant diagonal c).

    Rows of `source_weights` / `target_weights` (B x N) count how often each pooled point is drawn
    into the source / target sample (0/1 for permutations, bootstrap counts otherwise). Pairs of a
    point with itself are left out, as in the U-statistic (Gretton et al. 2012, eq. 3):
        k_ss = (w^T K w - c sum w_i^2) / ((sum w)^2 - sum w_i^2),  likewise k_tt,  k_st = w^T K v / (sum w sum v).
    """
    diagonal = kernel[0, 0]

    def within(w: Tensor) -> Tensor:
        total, squares = w.sum(1), (w * w).sum(1)
        return (((w @ kernel) * w).sum(1) - diagonal * squares) / (total * total - squares)

    cross = ((source_weights @ kernel) * target_weights).sum(1) / (source_weights.sum(1) * target_weights.sum(1))
    return within(source_weights) + within(target_weights) - 2 * cross


def mmd_gap(source: Tensor, target: Tensor, bandwidths: Tensor, scale: float, generator: torch.Generator,
            permutations: int = 200, bootstraps: int = 200) -> GapEstimate:
    """MMD^2_u x `scale` with fixed `bandwidths`, its permutation floor, p-value and bootstrap interval."""
    pooled = torch.cat([source, target]).double()
    kernel = gaussian_kernel(squared_distances(pooled, pooled), bandwidths.double())
    n_s, n_t = len(source), len(target)
    observed_s = torch.cat([torch.ones(n_s), torch.zeros(n_t)]).double()[None]
    observed = float(weighted_mmd2(kernel, observed_s, 1 - observed_s)) * scale
    member = _membership(n_s, n_t, permutations, generator)
    null = weighted_mmd2(kernel, member, 1 - member).numpy() * scale
    boot = weighted_mmd2(kernel, *_bootstrap_counts(n_s, n_t, bootstraps, generator)).numpy() * scale
    return GapEstimate(observed, float(np.quantile(null, FLOOR_QUANTILE)), permutation_p_value(observed, null),
                       *_interval(boot))


def spectral_gap(source: Tensor, target: Tensor, generator: torch.Generator, permutations: int = 200,
                 bootstraps: int = 200, alpha: float = 0.01, store: CalibrationStore | None = None) -> GapEstimate:
    """The spectral rank of the shift (`rank/spectral.py`) against its permutation null and with a
    bootstrap interval, every resampled pair's covariances computed in one batch; the data-free
    null simulations that calibrate the cut-offs come from `store` when it holds them."""
    observed = float(spectral_shift_rank(source, target, alpha, store).rank)
    n_s, n_t = len(source), len(target)
    member = _membership(n_s, n_t, permutations, generator)
    null = resampled_spectral_ranks(source, target, member, 1 - member, alpha, store=store).astype(float)
    boot = resampled_spectral_ranks(source, target, *_bootstrap_counts(n_s, n_t, bootstraps, generator), alpha,
                                    resampled=True, store=store)
    return GapEstimate(observed, float(np.quantile(null, FLOOR_QUANTILE)), permutation_p_value(observed, null),
                       *_interval(boot.astype(float)))


def resampled_gap(distance: Callable[[Tensor, Tensor, Tensor, Tensor], float], source: Tensor,
                  source_labels: Tensor, target: Tensor, target_labels: Tensor, generator: torch.Generator,
                  permutations: int = 200, bootstraps: int = 200) -> GapEstimate:
    """Any distance against its permutation null (labels move with their points) and bootstrap."""
    pooled, pooled_labels = torch.cat([source, target]), torch.cat([source_labels, target_labels])
    n_s, n = len(source), len(source) + len(target)
    observed = float(distance(source, source_labels, target, target_labels))
    null = []
    for _ in range(permutations):
        order = torch.randperm(n, generator=generator)
        first, second = order[:n_s], order[n_s:]
        null.append(float(distance(pooled[first], pooled_labels[first], pooled[second], pooled_labels[second])))
    boot = []
    for _ in range(bootstraps):
        pick_s = torch.randint(0, n_s, (n_s,), generator=generator)
        pick_t = torch.randint(0, len(target), (len(target),), generator=generator)
        boot.append(float(distance(source[pick_s], source_labels[pick_s], target[pick_t], target_labels[pick_t])))
    null = np.array(null)
    return GapEstimate(observed, float(np.quantile(null, FLOOR_QUANTILE)), permutation_p_value(observed, null),
                       *_interval(np.array(boot)))


def stratified_halves(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two disjoint halves of a labelled sample, each class split in two (odd counts: one more in
    the second), so both halves keep every class."""
    first, second = [], []
    for label in torch.unique(labels):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2:])
    return torch.cat(first), torch.cat(second)


def otdd_gap(source: Tensor, source_labels: Tensor, target: Tensor, target_labels: Tensor,
             generator: torch.Generator, draws: int = 20, **options) -> GapEstimate:
    """OTDD between half samples minus its source-vs-source null mean (module docstring). Each draw
    splits the source into two class-stratified halves A and B and takes a stratified half T of the
    target: null OTDD(A, B), measured OTDD(A, T), so both see the same kinds of sample sizes."""
    if min(len(source), len(target)) < 4:
        raise ValueError(f"the otdd gap needs >= 4 held-out source and target samples, got {len(source)} and "
                         f"{len(target)}; raise stage2.max_samples")

    def value(first: Tensor, second: Tensor, other: Tensor, other_labels: Tensor) -> float:
        with torch.no_grad():
            return float(otdd(source[first], source_labels[first], other[second], other_labels[second], **options))

    null, measured = [], []
    for _ in range(draws):
        half_a, half_b = stratified_halves(source_labels, generator)
        half_t, _ = stratified_halves(target_labels, generator)
        null.append(value(half_a, half_b, source, source_labels))
        measured.append(value(half_a, half_t, target, target_labels))
    null, measured = np.array(null), np.array(measured)
    bias = float(null.mean())
    observed = float(measured.mean())
    return GapEstimate(observed - bias, float(np.quantile(null, FLOOR_QUANTILE)) - bias,
                       permutation_p_value(observed, null), *_interval(measured - bias))


def c2st_test(source: Tensor, target: Tensor, seed: int) -> GapEstimate:
    """The C2ST gap 2 |acc - 1/2| against the binomial null of its held-out accuracy."""
    n = len(source) + len(target)
    gap = c2st_gap(source, target, seed=seed)
    correct = int(round((0.5 + gap / 2) * n))
    floor = 2 * (stats.binom.ppf(FLOOR_QUANTILE, n, 0.5) / n - 0.5)
    interval = stats.binomtest(correct, n).proportion_ci(INTERVAL, method="exact")
    return GapEstimate(gap, float(floor), float(stats.binom.sf(correct - 1, n, 0.5)),
                       2 * max(interval.low - 0.5, 0.0), 2 * (interval.high - 0.5))
