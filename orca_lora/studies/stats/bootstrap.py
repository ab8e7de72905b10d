"""Bootstrap over seeds and test samples for functions of seed-averaged errors (README, "The rank-vs-gap study").

Each replicate draws seeds with replacement and test samples with replacement (Efron & Tibshirani
1993, ch. 6), the same draw for every group in a comparison, so that groups sharing their seeds
(stage 1's embedder, the data) and their test samples stay paired. Drawing by multinomial weights
keeps it one matrix product per group instead of a copy of the errors per replicate.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def resampling_counts(n_seeds: int, n_samples: int, n_draws: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """How often each seed and each sample is drawn when S seeds and N samples are drawn with
    replacement, n_draws times: (n_draws, S) ~ Multinomial(S, 1/S) and (n_draws, N) ~ Multinomial(N, 1/N)."""
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_draws)
    sample_counts = rng.multinomial(n_samples, np.full(n_samples, 1.0 / n_samples), size=n_draws)
    return seed_counts, sample_counts


def resampled_means(errors: np.ndarray, counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Errors (S, ..., N) over seeds and samples -> (B, ...) bootstrap means
    sum_s,n w_s v_n e[s, ..., n] / (S N), one per draw of `resampling_counts`."""
    seed_counts, sample_counts = counts
    n_seeds, n_samples = errors.shape[0], errors.shape[-1]
    return np.einsum("bs,s...n,bn->b...", seed_counts, errors, sample_counts, optimize=True) / (n_seeds * n_samples)


def replicate_means(errors: Sequence[np.ndarray], n_resamples: int, seed: int = 0) -> list[np.ndarray]:
    """For groups with errors (S, N) over the same S seeds and N samples: per group the (n_resamples,)
    bootstrap means, the same draw of seeds and samples for every group."""
    shapes = {np.shape(group) for group in errors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"groups must share one (seeds, samples) shape to be paired, got {sorted(shapes)}")
    counts = resampling_counts(*next(iter(shapes)), n_resamples, np.random.default_rng(seed))
    return [resampled_means(np.asarray(group, float), counts) for group in errors]


def percentile_interval(values: np.ndarray, level: float = 0.95, axis: int = -1) -> np.ndarray:
    """The percentile interval (Efron & Tibshirani 1993, sec. 13.3): the (1 -+ level) / 2 quantiles."""
    return np.quantile(values, [(1 - level) / 2, (1 + level) / 2], axis=axis)


def bootstrap_interval(statistic: Callable[..., np.ndarray], errors: Sequence[np.ndarray], n_resamples: int = 999,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """`statistic` of the groups' mean errors (applied elementwise to arrays of replicate means), its
    percentile interval: (estimate, low, high)."""
    estimate = float(statistic(*[np.asarray(group, float).mean() for group in errors]))
    replicates = statistic(*replicate_means(errors, n_resamples, seed))
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return estimate, float("nan"), float("nan")
    low, high = percentile_interval(replicates, level)
    return estimate, float(low), float(high)


def seed_standard_error(per_seed: np.ndarray, axis: int = 0) -> np.ndarray:
    """Standard error of the mean over seeds along `axis`: sd (ddof = 1) / sqrt(S); NaN with one seed."""
    per_seed = np.asarray(per_seed, float)
    n_seeds = per_seed.shape[axis]
    if n_seeds < 2:
        return np.full(np.delete(per_seed.shape, axis), np.nan) if per_seed.ndim > 1 else np.float64(np.nan)
    return per_seed.std(axis=axis, ddof=1) / np.sqrt(n_seeds)


def seed_se(errors: np.ndarray) -> float:
    """Standard error over seeds of the per-seed mean errors of errors (S, N) (NaN with one seed)."""
    return float(seed_standard_error(np.asarray(errors, float).mean(axis=1)))


def bootstrap_p_value(replicates: np.ndarray, null: float) -> float:
    """Two-sided bootstrap p for slope = null: min(1, 2 min(P*(b* <= null), P*(b* >= null))), each
    tail (1 + count) / (B + 1)."""
    n = len(replicates)
    below = (1 + np.sum(replicates <= null)) / (n + 1)
    above = (1 + np.sum(replicates >= null)) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))
