"""A modality gap in rank units: how many directions the target's distribution departs in.

With S_s, S_t the sample covariances (divisor n - 1) of source (n_s, d) and target (n_t, d), the
eigenvalues l_1 >= ... >= l_d of the generalised problem S_t v = l S_s v are those of the
F-matrix S_s^(-1/2) S_t S_s^(-1/2). Under the null (same Gaussian distribution) they are free of
the common covariance: an F-matrix of two independent Wisharts, whose spectrum fills Wachter's
(1980) bulk, "The limiting empirical measure of multiple discriminant ratios", with edges

    lower, upper = (1 -+ h)^2 / (1 - y2)^2,   h = sqrt(y1 + y2 - y1 y2),
    y1 = d / (n_t - 1) (numerator, target),  y2 = d / (n_s - 1) (denominator, source), y2 < 1

(Bai & Silverstein 2010, "Spectral analysis of large dimensional random matrices", Thm 4.10;
y2 -> 0 gives the Marchenko & Pastur 1967 edges (1 -+ sqrt(y1))^2 of a sample covariance against
a known one). A planted rank-k covariance change pushes k eigenvalues outside the bulk once its
strength passes (1 + h) / (1 - y2) (Wang & Yao 2017, spiked Fisher matrices).

Finite-n rule. The extreme eigenvalues fluctuate about the edges on a Tracy-Widom scale
(Johnstone 2001, 2008), so the edges alone would flag a null eigenvalue often. Because the null
law of the F-matrix does not depend on the covariance, it is simulated exactly for Gaussian data
at the same (d, n_s, n_t): `NULL_DRAWS` seeded draws of the largest and smallest eigenvalue. An
eigenvalue counts when it lies above mean + `TW_Z` sd of the simulated largest, or below mean -
`TW_Z` sd of the simulated smallest. `TW_Z` = 3.5: Tracy-Widom (beta = 1) has mean -1.21, sd 1.27
and 99.9% point 3.27 (Tracy & Widom 1996; Johnstone 2001, table 1), i.e. 3.53 sd above its mean,
so each side's false-flag rate is about 0.1% (less on the lower side, whose tail is lighter).

Mean shift: Hotelling's two-sample T^2 with pooled covariance (Hotelling 1931),
    T^2 = n_s n_t / (n_s + n_t) (m_t - m_s)^T S_p^(-1) (m_t - m_s),
    F = (n_s + n_t - d - 1) / (d (n_s + n_t - 2)) T^2 ~ F(d, n_s + n_t - d - 1) under the null;
significant when its p-value < alpha. A significant shift adds one to the rank: a translation
is one rank-1 update, however large its MMD.

rank = covariance_rank (eigenvalues outside the calibrated bulk) + mean_shift. Invariant to any
invertible affine map applied to both sets. Directions the source does not vary in (a LayerNorm's
sum-to-zero constraint) are dropped first (`source_subspace`). Needs n_s, n_t >= 4 d (`MIN_SAMPLES_PER_DIM`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.linalg
import scipy.stats
from torch import Tensor

MIN_SAMPLES_PER_DIM = 4
NULL_DRAWS = 100
TW_Z = 3.5
NULL_SEED = 0


@dataclass(frozen=True)
class SpectralShift:
    rank: int  # covariance_rank + mean_shift
    covariance_rank: int  # eigenvalues outside [lower_threshold, upper_threshold]
    mean_shift: bool  # Hotelling's T^2 p-value < alpha
    eigenvalues: np.ndarray  # of S_s^(-1/2) S_t S_s^(-1/2), descending
    lower_edge: float  # Wachter's asymptotic bulk edges
    upper_edge: float
    lower_threshold: float  # calibrated finite-n cut-offs actually applied
    upper_threshold: float
    mean_shift_p_value: float


def wachter_edges(d: int, n_s: int, n_t: int) -> tuple[float, float]:
    """Bulk edges of the F-matrix S_s^(-1/2) S_t S_s^(-1/2) with n_s - 1 and n_t - 1 degrees of
    freedom (centred sample covariances): (1 -+ h)^2 / (1 - y2)^2, see the module docstring."""
    y1, y2 = d / (n_t - 1), d / (n_s - 1)
    if not y2 < 1:
        raise ValueError(f"the source covariance is singular: d={d} >= n_s - 1={n_s - 1}")
    h = np.sqrt(y1 + y2 - y1 * y2)
    return float((1 - h) ** 2 / (1 - y2) ** 2), float((1 + h) ** 2 / (1 - y2) ** 2)


def _covariance(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(0)
    return centred.T @ centred / (x.shape[0] - 1)


def null_extremes(d: int, n_s: int, n_t: int, draws: int = NULL_DRAWS,
                  seed: int = NULL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest F-matrix eigenvalue in `draws` seeded null draws (Gaussian data,
    identity covariance, which loses nothing: the null law is covariance-free)."""
    return _null_extremes(d, n_s, n_t, draws, seed)


@lru_cache(maxsize=64)
def _null_extremes(d: int, n_s: int, n_t: int, draws: int, seed: int):
    rng = np.random.default_rng(seed)
    smallest, largest = np.empty(draws), np.empty(draws)
    for k in range(draws):
        # n - 1 standard normal rows have the law of a centred n-sample's scatter
        xs, xt = rng.standard_normal((n_s - 1, d)), rng.standard_normal((n_t - 1, d))
        values = scipy.linalg.eigh(xt.T @ xt / (n_t - 1), xs.T @ xs / (n_s - 1), eigvals_only=True)
        smallest[k], largest[k] = values[0], values[-1]
    smallest.flags.writeable = largest.flags.writeable = False
    return smallest, largest


def calibrated_thresholds(d: int, n_s: int, n_t: int) -> tuple[float, float]:
    """(lower, upper) cut-offs: mean -+ TW_Z sd of the simulated null extremes."""
    smallest, largest = null_extremes(d, n_s, n_t)
    return (float(smallest.mean() - TW_Z * smallest.std(ddof=1)),
            float(largest.mean() + TW_Z * largest.std(ddof=1)))


def hotelling_p_value(source: np.ndarray, target: np.ndarray) -> float:
    """p-value of Hotelling's two-sample T^2 (pooled covariance, F distribution)."""
    (n_s, d), n_t = source.shape, target.shape[0]
    pooled = ((n_s - 1) * _covariance(source) + (n_t - 1) * _covariance(target)) / (n_s + n_t - 2)
    diff = target.mean(0) - source.mean(0)
    t2 = n_s * n_t / (n_s + n_t) * float(diff @ scipy.linalg.solve(pooled, diff, assume_a="pos"))
    dof = n_s + n_t - d - 1
    return float(scipy.stats.f.sf(dof / (d * (n_s + n_t - 2)) * t2, d, dof))


def check_sample_sizes(n_s: int, n_t: int, d: int) -> None:
    low = MIN_SAMPLES_PER_DIM * d
    if n_s < low or n_t < low:
        raise ValueError(
            f"spectral gap needs n >= {MIN_SAMPLES_PER_DIM} x width = {low} samples on each side at "
            f"width {d}, got n_s={n_s}, n_t={n_t}; raise stage2.max_samples (and the source proxy "
            "samples) or use a smaller body"
        )


def source_subspace(source: np.ndarray, target: np.ndarray,
                    relative_floor: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Both sets in the span of the source's non-degenerate principal directions.

    Features after a LayerNorm sum to zero across channels (the Swin's first block input is
    one), so S_s is singular and S_s^(-1/2) undefined; a direction the source does not vary in
    (variance below `relative_floor` x the largest) is dropped, and `d` is the dimension kept.
    """
    variances, directions = np.linalg.eigh(_covariance(source))
    kept = directions[:, variances > relative_floor * variances.max()]
    return source @ kept, target @ kept


def spectral_shift_rank(source: Tensor, target: Tensor, alpha: float = 0.01) -> SpectralShift:
    """The shift's dimension between source (n_s, d) and target (n_t, d) features.

    Covariance part: eigenvalues of S_s^(-1/2) S_t S_s^(-1/2) outside the null bulk calibrated
    at this (d, n_s, n_t) (module docstring); mean part: +1 when Hotelling's T^2 p < `alpha`.
    Default alpha 0.01 so the whole null false-positive rate (mean test plus both edges, ~0.2%)
    stays near 1%.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must be (n, d) with the same d, got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    xs, xt = source_subspace(source.detach().cpu().double().numpy(), target.detach().cpu().double().numpy())
    (n_s, d), n_t = xs.shape, xt.shape[0]
    check_sample_sizes(n_s, n_t, d)
    if not (np.isfinite(xs).all() and np.isfinite(xt).all()):
        raise ValueError("spectral gap: features contain NaN or inf")
    eigenvalues = scipy.linalg.eigh(_covariance(xt), _covariance(xs), eigvals_only=True)[::-1]
    lower_edge, upper_edge = wachter_edges(d, n_s, n_t)
    lower, upper = calibrated_thresholds(d, n_s, n_t)
    covariance_rank = int((eigenvalues > upper).sum() + (eigenvalues < lower).sum())
    p_value = hotelling_p_value(xs, xt)
    mean_shift = p_value < alpha
    return SpectralShift(covariance_rank + int(mean_shift), covariance_rank, mean_shift,
                         eigenvalues.copy(), lower_edge, upper_edge, lower, upper, p_value)
