"""Bootstrap over seeds and test samples for functions of seed-averaged errors (DESIGN 8).

Each replicate draws seeds with replacement and test samples with replacement (Efron & Tibshirani
1993, ch. 6), the same draw for every group in a comparison, so that groups sharing their seeds
(stage 1's embedder, the data) and their test samples stay paired. Drawing by multinomial weights
keeps it one matrix product per group instead of a copy of the errors per replicate.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def replicate_means(errors: Sequence[np.ndarray], n_resamples: int, seed: int = 0) -> list[np.ndarray]:
    """For groups with errors (S, N) over the same S seeds and N samples: per group the (n_resamples,)
    bootstrap means sum_s,n w_s v_n e[s, n] / (S N), with w ~ Multinomial(S, 1/S), v ~ Multinomial(N, 1/N)."""
    shapes = {np.shape(group) for group in errors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"groups must share one (seeds, samples) shape to be paired, got {sorted(shapes)}")
    n_seeds, n_samples = next(iter(shapes))
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_resamples)
    sample_weights = rng.multinomial(n_samples, np.full(n_samples, 1.0 / n_samples), size=n_resamples)
    return [np.einsum("bs,sn,bn->b", seed_weights, np.asarray(group, float), sample_weights) / (n_seeds * n_samples)
            for group in errors]


def bootstrap_interval(statistic: Callable[..., np.ndarray], errors: Sequence[np.ndarray], n_resamples: int = 999,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """`statistic` of the groups' mean errors (applied elementwise to arrays of replicate means), its
    percentile interval: (estimate, low, high)."""
    estimate = float(statistic(*[np.asarray(group, float).mean() for group in errors]))
    replicates = statistic(*replicate_means(errors, n_resamples, seed))
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return estimate, float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return estimate, float(low), float(high)


def seed_se(errors: np.ndarray) -> float:
    """Standard error over seeds of the per-seed mean errors (NaN with one seed)."""
    per_seed = np.asarray(errors, float).mean(axis=1)
    return float(per_seed.std(ddof=1) / np.sqrt(per_seed.size)) if per_seed.size > 1 else float("nan")
