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

Resampled pairs. The permutation null and the bootstrap interval (`rank/null.py`) need the rank of
hundreds of resampled pairs; `spectral_shift_ranks` computes them in one batch: every pair's two
covariances as weighted sums over the pooled points, their generalised eigenvalues from one batched
Cholesky and eigvalsh, Hotelling's T^2 from one batched solve. A bootstrap resample repeats points,
so its covariances are noisier and its bulk wider than a sample's of the same size: read against a
sample's cut-offs its rank would be inflated (at width 192, n = 768, a pair read 3 while its resamples read
30-36 in one trial). Resamples are therefore read against cut-offs simulated on bootstrap resamples of null
Gaussian samples (`null_calibration(resampled=True)`), T^2 rescaled by its simulated null mean.

rank = covariance_rank (eigenvalues outside the calibrated bulk) + mean_shift. Invariant to any
invertible affine map applied to both sets. Directions the source does not vary in (a LayerNorm's
sum-to-zero constraint) are dropped first (`source_subspace`). Needs n_s, n_t >= 4 d (`MIN_SAMPLES_PER_DIM`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import MutableMapping, Optional

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch import Tensor

MIN_SAMPLES_PER_DIM = 4
NULL_DRAWS = 100
TW_Z = 3.5
NULL_SEED = 0
SMALLEST_SINGLE_VARIANCE = 1e-3  # of either side, in pooled-whitened units, for float32 sums
NULL_VERSION = 1  # bump when the simulations below change, so stored ones are not reused

# A store of simulated nulls (key -> array) that outlives the process, e.g. a folder of files
# (`rank/calibration_store.py`); the simulations are data-free, so every run at the same sizes reads them
CalibrationStore = MutableMapping[str, np.ndarray]


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


def weighted_moments(x: Tensor, weights: Tensor, chunk: int = 32, single: bool = True) -> tuple[Tensor, Tensor]:
    """Mean (B, d) and covariance (B, d, d), divisor sum(w) - 1, of each sample that a row of
    `weights` (B, N) draws from the points x (N, d), or from its own points when x is (B, N, d):
    0/1 rows for permutations, counts for a bootstrap.

        S_b = (sum_i w_bi c_i c_i^T - n_b u_b u_b^T) / (n_b - 1),  c_i = x_i - mean(x),  u_b = m_b - mean(x),
        n_b = sum_i w_bi,  m_b = sum_i w_bi x_i / n_b.

    The means and the correction are float64; the weighted products, the cost (B N d^2), are summed
    in float32 when `single`: exact enough for points of unit scale in every direction, which
    `_checked_subspace` makes them (whitened by the pooled covariance, so no row mean u_b is far
    from the centre and nothing cancels); `single=False` sums in float64.
    """
    x = x.double()
    weights = weights.double()
    drawn = (weights != 0).any(0)
    if not drawn.all():  # a bootstrap of one side never draws the other side's points: skip them
        x, weights = x[..., drawn, :], weights[:, drawn]
    totals = weights.sum(1)
    centre = x.mean(-2, keepdim=True)
    offsets = (weights[:, None, :] @ (x - centre)).squeeze(-2) / totals[:, None]
    dtype = torch.float32 if single else torch.float64
    centred = (x - centre).to(dtype)
    covariances = []
    # 0/1 rows of one size (a permutation's side) gather their points instead of weighting all N by 0 or 1
    chosen = None
    if centred.ndim == 2 and torch.all((weights == 0) | (weights == 1)) and torch.all(totals == totals[0]):
        chosen = torch.argsort(weights, dim=1, descending=True, stable=True)[:, :int(totals[0])]
    for index, (w, u, n) in enumerate(zip(weights.to(dtype).split(chunk), offsets.split(chunk), totals.split(chunk))):
        if chosen is not None:
            points = centred[chosen[index * chunk: index * chunk + len(w)]]
            second = (points.mT @ points).double()
        else:
            points = centred[index * chunk: index * chunk + len(w)] if centred.ndim == 3 else centred
            second = ((w[:, :, None] * points).mT @ points).double()
        covariances.append((second - n[:, None, None] * u[:, :, None] * u[:, None, :]) / (n - 1)[:, None, None])
    return offsets + centre.squeeze(-2), torch.cat(covariances)


def pair_moments(points: Tensor, source_weights: Tensor, target_weights: Tensor,
                 single: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`weighted_moments` of the source and the target rows of each resampled pair: (source mean,
    source covariance, target mean, target covariance). When every row splits the points in two
    (a permutation: target = 1 - source), the target's scatter is the total's minus the source's,

        R_t = T - R_s,  R = (n - 1) S + n u u^T,  T = (N - 1) cov(points),  u = m - mean(points),

    which halves the cost; otherwise both are summed."""
    source_mean, source_covariance = weighted_moments(points, source_weights, single=single)
    if not torch.equal(source_weights + target_weights, torch.ones_like(source_weights)):
        return (source_mean, source_covariance, *weighted_moments(points, target_weights, single=single))
    points = points.double()
    centre = points.mean(0)
    n_s = source_weights.sum(1).double()[:, None, None]
    n_t = len(points) - n_s
    u_s = (source_mean - centre)[:, :, None]
    u_t = -u_s * n_s / n_t
    total = torch.from_numpy(_covariance(points.numpy())) * (len(points) - 1)
    source_scatter = (n_s - 1) * source_covariance + n_s * u_s @ u_s.mT
    target_covariance = (total - source_scatter - n_t * u_t @ u_t.mT) / (n_t - 1)
    return source_mean, source_covariance, centre + u_t[:, :, 0], target_covariance


def generalized_eigenvalues(target_covariance: Tensor, source_covariance: Tensor) -> Tensor:
    """Ascending eigenvalues of S_s^(-1/2) S_t S_s^(-1/2) for a batch (..., d, d): with S_s = L L^T
    (Cholesky), those of L^(-1) S_t L^(-T), which has the same spectrum."""
    lower = torch.linalg.cholesky(source_covariance)
    half = torch.linalg.solve_triangular(lower, target_covariance, upper=False)
    whitened = torch.linalg.solve_triangular(lower, half.mT, upper=False)
    return torch.linalg.eigvalsh((whitened + whitened.mT) / 2)


def hotelling_statistics(source_mean: Tensor, source_covariance: Tensor, target_mean: Tensor,
                         target_covariance: Tensor, n_s: int, n_t: int) -> np.ndarray:
    """Hotelling's two-sample T^2 with pooled covariance, one per batch row."""
    pooled = ((n_s - 1) * source_covariance + (n_t - 1) * target_covariance) / (n_s + n_t - 2)
    diff = (target_mean - source_mean).to(pooled.dtype)[..., None]
    solved = torch.cholesky_solve(diff, torch.linalg.cholesky(pooled))
    return (n_s * n_t / (n_s + n_t) * (diff * solved).sum((-2, -1))).double().numpy()


def hotelling_p_values(t2: np.ndarray, d: int, n_s: int, n_t: int) -> np.ndarray:
    """p-values of T^2 under its null F law: F = (n_s + n_t - d - 1) / (d (n_s + n_t - 2)) T^2."""
    dof = n_s + n_t - d - 1
    return scipy.stats.f.sf(dof / (d * (n_s + n_t - 2)) * t2, d, dof)


def null_extremes(d: int, n_s: int, n_t: int, draws: int = NULL_DRAWS, seed: int = NULL_SEED,
                  store: Optional[CalibrationStore] = None) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest F-matrix eigenvalue in `draws` seeded null draws (Gaussian data,
    identity covariance, which loses nothing: the null law is covariance-free)."""
    smallest, largest = _stored("extremes", d, n_s, n_t, draws, seed, store)
    return smallest, largest


def _stored(kind: str, d: int, n_s: int, n_t: int, draws: int, seed: int,
            store: Optional[CalibrationStore]) -> np.ndarray:
    """A simulated null, from `store` when it holds it, else simulated (once per process) and put there."""
    key = f"{kind}-v{NULL_VERSION}-d{d}-ns{n_s}-nt{n_t}-draws{draws}-seed{seed}"
    if store is not None and key in store:
        return store[key]
    simulated = _SIMULATIONS[kind](d, n_s, n_t, draws, seed)
    if store is not None:
        store[key] = simulated
    return simulated


@lru_cache(maxsize=64)
def _simulated_extremes(d: int, n_s: int, n_t: int, draws: int, seed: int) -> np.ndarray:
    """(2, draws): the smallest and the largest eigenvalue of each null draw."""
    generator = torch.Generator().manual_seed(seed)
    smallest, largest = [], []
    for batch in torch.arange(draws).split(25):
        # n - 1 standard normal rows have the law of a centred n-sample's scatter
        # float32 is exact enough for standard normal scatters, and twice as fast to draw and sum
        xs = torch.randn(len(batch), n_s - 1, d, generator=generator)
        xt = torch.randn(len(batch), n_t - 1, d, generator=generator)
        values = generalized_eigenvalues((xt.mT @ xt).double() / (n_t - 1), (xs.mT @ xs).double() / (n_s - 1))
        smallest.append(values[:, 0])
        largest.append(values[:, -1])
    simulated = torch.stack([torch.cat(smallest), torch.cat(largest)]).numpy()
    simulated.flags.writeable = False
    return simulated


@dataclass(frozen=True)
class NullCalibration:
    """Cut-offs for one (d, n_s, n_t): eigenvalues outside [lower, upper] count, and T^2 is read
    after dividing by t2_scale (1 for a sample; > 1 for a bootstrap resample, whose repeated points
    make its covariances noisier and its mean difference vary twice: as sample and as resample)."""

    lower: float
    upper: float
    t2_scale: float


def null_calibration(d: int, n_s: int, n_t: int, resampled: bool = False,
                     store: Optional[CalibrationStore] = None) -> NullCalibration:
    """The cut-offs for a sample pair or, `resampled`, for a bootstrap resample of one: mean -+ TW_Z
    sd of the simulated null extremes (`null_extremes`), and for a resample the extremes and T^2
    simulated on bootstrap resamples of null Gaussian samples, T^2 scaled by its simulated mean over
    the F law's mean d (N - 2) / (N - d - 3)."""
    if not resampled:
        smallest, largest = null_extremes(d, n_s, n_t, store=store)
        t2_scale = 1.0
    else:
        smallest, largest, t2 = _stored("resamples", d, n_s, n_t, NULL_DRAWS, NULL_SEED, store)
        total = n_s + n_t
        t2_scale = float(t2.mean() / (d * (total - 2) / (total - d - 3)))
    return NullCalibration(float(smallest.mean() - TW_Z * smallest.std(ddof=1)),
                           float(largest.mean() + TW_Z * largest.std(ddof=1)), t2_scale)


def calibrated_thresholds(d: int, n_s: int, n_t: int,
                          store: Optional[CalibrationStore] = None) -> tuple[float, float]:
    """(lower, upper) cut-offs of a sample pair: mean -+ TW_Z sd of the simulated null extremes."""
    calibration = null_calibration(d, n_s, n_t, store=store)
    return calibration.lower, calibration.upper


@lru_cache(maxsize=64)
def _simulated_resamples(d: int, n_s: int, n_t: int, draws: int, seed: int) -> np.ndarray:
    """(3, draws): smallest and largest eigenvalue and T^2 of bootstrap resamples of null samples."""
    generator = torch.Generator().manual_seed(seed)
    smallest, largest, t2 = [], [], []
    for batch in torch.arange(draws).split(25):
        points = torch.randn(len(batch), n_s + n_t, d, generator=generator)
        counts_s = torch.zeros(len(batch), n_s + n_t)
        counts_t = torch.zeros_like(counts_s)
        counts_s.scatter_add_(1, torch.randint(0, n_s, (len(batch), n_s), generator=generator), torch.ones(len(batch), n_s))
        counts_t.scatter_add_(1, n_s + torch.randint(0, n_t, (len(batch), n_t), generator=generator),
                              torch.ones(len(batch), n_t))
        source_mean, source_covariance = weighted_moments(points, counts_s)
        target_mean, target_covariance = weighted_moments(points, counts_t)
        values = generalized_eigenvalues(target_covariance, source_covariance)
        smallest.append(values[:, 0])
        largest.append(values[:, -1])
        t2.append(torch.from_numpy(hotelling_statistics(source_mean, source_covariance, target_mean,
                                                        target_covariance, n_s, n_t)))
    simulated = torch.stack([torch.cat(smallest), torch.cat(largest), torch.cat(t2)]).numpy()
    simulated.flags.writeable = False
    return simulated


_SIMULATIONS = {"extremes": _simulated_extremes, "resamples": _simulated_resamples}


def clear_calibration_cache() -> None:
    """Forget the simulated nulls kept for the process's life (a store keeps its own), so a timing
    sees what a fresh process pays."""
    for simulate in _SIMULATIONS.values():
        simulate.cache_clear()


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
    """Both sets in the source's non-degenerate principal coordinates, each scaled to unit source
    variance (whitened by the source: an invertible map on the kept span, which leaves the F-matrix
    eigenvalues and T^2 unchanged and lets `weighted_moments` sum in single precision).

    Features after a LayerNorm sum to zero across channels (the Swin's first block input is
    one), so S_s is singular and S_s^(-1/2) undefined; a direction the source does not vary in
    (variance below `relative_floor` x the largest) is dropped, and `d` is the dimension kept.
    """
    variances, directions = np.linalg.eigh(_covariance(source))
    kept = variances > relative_floor * variances.max()
    whitening = directions[:, kept] / np.sqrt(variances[kept])
    centre = source.mean(0)
    return (source - centre) @ whitening, (target - centre) @ whitening


def _single_precision_suffices(points: Tensor, source_weights: Tensor, target_weights: Tensor) -> bool:
    """Whether float32 sums keep every covariance of these unit-scale points definite: each side's
    smallest variance direction must carry >= SMALLEST_SINGLE_VARIANCE (float32's rounding of the
    unit-scale products is ~1e-7; a side whose variance in some direction is far below the pooled
    one, a target 1e3 x wider than the source say, goes to float64)."""
    _, covariances = weighted_moments(points, torch.stack([source_weights, target_weights]), single=False)
    return bool(torch.linalg.eigvalsh(covariances).amin() >= SMALLEST_SINGLE_VARIANCE)


def spectral_shift_ranks(points: Tensor, source_weights: Tensor, target_weights: Tensor,
                         alpha: float = 0.01, resampled: bool = False,
                         store: Optional[CalibrationStore] = None) -> np.ndarray:
    """`spectral_shift_rank` of many resampled pairs at once: row b of the (B, N) weights draws its
    source and its target from the same points (N, d): 0/1 rows (a permutation) or, `resampled`,
    bootstrap counts, read against the bootstrap's own calibration (`null_calibration`). Every pair
    has the sizes of the first row, so one calibration serves them all."""
    n_s, n_t = int(source_weights[0].sum()), int(target_weights[0].sum())
    d = points.shape[1]
    check_sample_sizes(n_s, n_t, d)
    calibration = null_calibration(d, n_s, n_t, resampled, store)
    single = _single_precision_suffices(points, source_weights[0], target_weights[0])
    source_mean, source_covariance, target_mean, target_covariance = pair_moments(points, source_weights,
                                                                                 target_weights, single)
    if single:  # unit-scale, well-conditioned covariances: float32 factorizations read the same ranks
        source_covariance, target_covariance = source_covariance.float(), target_covariance.float()
    values = generalized_eigenvalues(target_covariance, source_covariance)
    covariance_ranks = ((values > calibration.upper).sum(1) + (values < calibration.lower).sum(1)).numpy()
    t2 = hotelling_statistics(source_mean, source_covariance, target_mean, target_covariance, n_s, n_t)
    return covariance_ranks + (hotelling_p_values(t2 / calibration.t2_scale, d, n_s, n_t) < alpha)


def resampled_spectral_ranks(source: Tensor, target: Tensor, source_weights: Tensor, target_weights: Tensor,
                             alpha: float = 0.01, resampled: bool = False,
                             store: Optional[CalibrationStore] = None) -> np.ndarray:
    """Ranks of resampled pairs drawn from the pooled [source; target] (rows of the (B, n_s + n_t)
    weights), all in the observed source's subspace, as the observed rank is."""
    xs, xt = _checked_subspace(source, target, alpha)
    return spectral_shift_ranks(torch.cat([xs, xt]), source_weights, target_weights, alpha, resampled, store)


def spectral_shift_rank(source: Tensor, target: Tensor, alpha: float = 0.01,
                        store: Optional[CalibrationStore] = None) -> SpectralShift:
    """The shift's dimension between source (n_s, d) and target (n_t, d) features.

    Covariance part: eigenvalues of S_s^(-1/2) S_t S_s^(-1/2) outside the null bulk calibrated
    at this (d, n_s, n_t) (module docstring); mean part: +1 when Hotelling's T^2 p < `alpha`.
    Default alpha 0.01 so the whole null false-positive rate (mean test plus both edges, ~0.2%)
    stays near 1%.
    """
    xs, xt = _checked_subspace(source, target, alpha)
    (n_s, d), n_t = xs.shape, xt.shape[0]
    check_sample_sizes(n_s, n_t, d)
    is_source = torch.cat([torch.ones(n_s), torch.zeros(n_t)])[None]
    points = torch.cat([xs, xt])  # one centring for both, so their means stay comparable
    source_mean, source_covariance = weighted_moments(points, is_source, single=False)
    target_mean, target_covariance = weighted_moments(points, 1 - is_source, single=False)
    eigenvalues = generalized_eigenvalues(target_covariance, source_covariance)[0].numpy()[::-1]
    lower_edge, upper_edge = wachter_edges(d, n_s, n_t)
    lower, upper = calibrated_thresholds(d, n_s, n_t, store)
    covariance_rank = int((eigenvalues > upper).sum() + (eigenvalues < lower).sum())
    t2 = hotelling_statistics(source_mean, source_covariance, target_mean, target_covariance, n_s, n_t)
    p_value = float(hotelling_p_values(t2, d, n_s, n_t)[0])
    mean_shift = p_value < alpha
    return SpectralShift(covariance_rank + int(mean_shift), covariance_rank, mean_shift,
                         eigenvalues.copy(), lower_edge, upper_edge, lower, upper, p_value)


def _checked_subspace(source: Tensor, target: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Both sets checked and in the source's non-degenerate subspace (`source_subspace`)."""
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must be (n, d) with the same d, got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not (torch.isfinite(source).all() and torch.isfinite(target).all()):
        raise ValueError("spectral gap: features contain NaN or inf")
    xs, xt = source_subspace(source.detach().cpu().double().numpy(), target.detach().cpu().double().numpy())
    # whitened by the pooled covariance too (invertible, so nothing changes but the scale): every
    # point, source or target, is then of unit scale, which weighted_moments' float32 sums need
    variances, directions = np.linalg.eigh(_covariance(np.concatenate([xs, xt])))
    whitening = directions / np.sqrt(variances)
    return torch.from_numpy(xs @ whitening), torch.from_numpy(xt @ whitening)
