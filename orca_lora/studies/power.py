"""Power and coverage of the rank-law analysis (`rank_threshold`) by simulating studies with a planted law.

A synthetic task t has a gap D_t and a true continuous threshold rank rho_t = c D_t^beta, c chosen per
beta so that the geometric mean of the rho_t is 2^center_log2_rank (default 2^2.5 ~ 5.7, the middle
of the grid 1..32; with beta = 0 every task gets that rho). Its error falls with the shape q(u),
u = log2(r / r_min), U = log2(r_max / r_min), u_rho = log2(rho_t / r_min), f the rule's fraction:
- r_min < rho < r_max: q is piecewise linear in u through (0, q_1), (u_rho, f), (U, 0), so q(r) > f
  exactly for r < rho;
- rho >= r_max: q = q_1 - (q_1 - f) u / u_rho below r_max and 0 at r_max (still falling there: r* = r_max,
  right-censored);
- rho <= r_min: q = 0 (flat): all the gain was had below the grid, r* = r_min (left-censored).
Two curves, one per r* rule (`rank_threshold.threshold_index`):
- the log-gain rule (the plan's primary since its amendment of 21:42), with the un-adapted error e(0):
  ln e(r) = ln e_inf + ln(e(0) / e_inf) q(r), q_1 the share of the log gain still to be had at r_min; the
  rule's tolerance is e_best (e(0) / e_best)^f, so the noiseless r* is the first grid rank >= rho;
- the gain rule (tolerance f of the gain from r_min, no rank 0): e(r) = e_inf + A q(r) with q_1 = 1.
Noise, relative to each rank's error: errors[s, r, n] = e(r) (1 + run[s, r] + sample[s, r, n]), run ~ N(0,
seed_sd^2) per (seed, rank), sample ~ N(0, sample_sd^2) independent per (seed, rank, validation sample); the rank-0
errors alike (the plan's amendment of 22:35: additive noise in units of e_best made the planted null's curves,
which span 2.5 orders of magnitude, negative).

Defaults: e_inf = 0.10 and seed_sd = 0.007 (of e(r)) are measured: Darcy flow, LoRA rank 4, 3 seeds, test
error 0.1052 +- 0.0004 (SE over seeds, so sd 0.0004 sqrt(3) = 0.0007, 0.7% of the error) in the allocation
comparison (README, `configs/sweep_compare_allocations.yaml`). e(0) / e_inf = 2, q_1 = 0.5 (the log-gain rule's
working values, fixed in the plan before the study), A = 0.03 (the gain rule's), sample_sd = 0.3 (of e(r)),
N = 128, S = 3 are the design's working values (not measured here); pass what the study measures.
The bootstrap inside the simulation uses n_resamples = 199 replicates (the analysis itself 999): part
of the design, since it sets the Monte Carlo error of each study's interval ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from orca_lora.studies.rank_threshold import (VERDICTS, TaskCurve, bootstrap_draws, declares_growth, observed_intervals,
                                              verdict_label)
from orca_lora.studies.stats.bootstrap import percentile_interval
from orca_lora.studies.stats.censored_regression import exact_line_slopes, fit_censored_line, identified_hull

RANKS = (1, 2, 4, 8, 16, 32)


@dataclass
class PowerResult:
    n_studies: int
    beta: float
    coverage: float  # fraction of studies whose interval holds the planted beta
    verdict_rates: dict[str, float]  # fraction of studies given each verdict label
    declared_growth: float  # fraction declared to grow (declares_growth)
    median_interval_width: float
    n_resamples: int


def threshold_ranks(gaps: np.ndarray, beta: float, center_log2_rank: float = 2.5) -> np.ndarray:
    """rho_t = c D_t^beta with log2 c set so that mean_t log2 rho_t = center_log2_rank."""
    log_gaps = np.log2(np.asarray(gaps, float))
    return 2.0 ** (center_log2_rank + beta * (log_gaps - log_gaps.mean()))


def gain_shape(ranks: np.ndarray, rho: float, gain_fraction: float = 0.1, first_share: float = 1.0) -> np.ndarray:
    """q(r) on the grid (module docstring): q(r_min) = first_share, q > gain_fraction exactly below rho's grid
    rank, q(r_max) = 0."""
    ranks = np.asarray(ranks, float)
    if not gain_fraction < first_share <= 1:
        raise ValueError(f"first_share must lie in (gain_fraction, 1] = ({gain_fraction}, 1], got {first_share}")
    u, total = np.log2(ranks / ranks[0]), np.log2(ranks[-1] / ranks[0])
    if rho <= ranks[0]:
        return np.zeros_like(u)
    u_rho = np.log2(rho / ranks[0])
    first = first_share - (first_share - gain_fraction) * u / u_rho
    if rho >= ranks[-1]:  # still falling at r_max: the grid's best, so its share of the gain left is 0
        return np.where(u < total, first, 0.0)
    second = gain_fraction * (total - u) / (total - u_rho)
    return np.where(u <= u_rho, first, second)


def noiseless_curve(ranks: np.ndarray, rho: float, gain_fraction: float, e_inf: float, gain: float,
                    unadapted_ratio: Optional[float], first_share: float) -> tuple[np.ndarray, Optional[float]]:
    """(e(r) on the grid, e(0) or None) for one synthetic task (module docstring): the log-gain rule's curve
    from e(0) = e_inf unadapted_ratio, or (unadapted_ratio None) the gain rule's e_inf + gain q (q_1 = 1)."""
    if unadapted_ratio is None:
        return e_inf + gain * gain_shape(ranks, rho, gain_fraction), None
    if unadapted_ratio <= 1:
        raise ValueError(f"unadapted_ratio e(0) / e_inf must exceed 1, got {unadapted_ratio}")
    return e_inf * unadapted_ratio ** gain_shape(ranks, rho, gain_fraction, first_share), e_inf * unadapted_ratio


def synthetic_curves(beta: float, rng: np.random.Generator, gaps: np.ndarray | None = None,
                     ranks: tuple[int, ...] = RANKS, gain_fraction: float = 0.1, e_inf: float = 0.10,
                     gain: float = 0.03, unadapted_ratio: Optional[float] = 2.0, first_share: float = 0.5,
                     seed_sd: float = 0.007, sample_sd: float = 0.3, n_samples: int = 128, n_seeds: int = 3,
                     center_log2_rank: float = 2.5) -> list[TaskCurve]:
    """One simulated study: per task errors (S, R, N) around e(r; rho_t), and the rank-0 errors (S, N) around
    e(0) (the log-gain rule; `unadapted_ratio=None`: the gain rule's curves, e_inf + gain q, no rank 0).
    The noise is relative: each error is its rank's e(r) times (1 + run + sample), so seed_sd and sample_sd are
    fractions of e(r) (a curve spanning orders of magnitude has per-sample errors that scale with it)."""
    gaps = np.geomspace(20, 900, 8) if gaps is None else np.asarray(gaps, float)
    ranks_array = np.asarray(ranks)
    curves = []
    for t, (gap, rho) in enumerate(zip(gaps, threshold_ranks(gaps, beta, center_log2_rank))):
        curve, reference = noiseless_curve(ranks_array, rho, gain_fraction, e_inf, gain, unadapted_ratio,
                                           first_share)
        run = rng.normal(0, seed_sd, (n_seeds, len(ranks), 1))
        sample = rng.normal(0, sample_sd, (n_seeds, len(ranks), n_samples))
        unadapted = None
        if reference is not None:
            unadapted = reference * (1 + rng.normal(0, seed_sd, (n_seeds, 1))
                                     + rng.normal(0, sample_sd, (n_seeds, n_samples)))
        curves.append(TaskCurve(f"synthetic-{t}", float(gap), ranks_array, curve[None, :, None] * (1 + run + sample),
                                unadapted))
    return curves


def simulate_power(beta: float, n_studies: int = 100, seed: int = 0, n_resamples: int = 199,
                   level: float = 0.95, gain_fraction: float = 0.1, **design) -> PowerResult:
    """Simulate n_studies studies with the planted beta, analyse each as `fit_threshold_law` does (its
    two-stage percentile bootstrap of beta, n_resamples replicates) and report the interval's coverage
    of beta, the verdict rates and the median interval width. `design` goes to `synthetic_curves`
    (gaps, ranks, e_inf, gain, unadapted_ratio, first_share, seed_sd, sample_sd, n_samples, n_seeds,
    center_log2_rank). Deterministic in `seed`. All studies' replicates are fitted in one batched call."""
    rng = np.random.default_rng(seed)
    xs, lows, highs, exact = [], [], [], []
    for _ in range(n_studies):
        curves = synthetic_curves(beta, rng, gain_fraction=gain_fraction, **design)
        exact.append(exact_line_slopes(*observed_intervals(curves, gain_fraction)))
        draws = bootstrap_draws(curves, n_resamples, rng, gain_fraction)
        xs.append(draws.x)
        lows.append(draws.low)
        highs.append(draws.high)
    slopes = fit_censored_line(np.concatenate(xs), np.concatenate(lows), np.concatenate(highs)).slope
    percentiles = percentile_interval(slopes.reshape(n_studies, n_resamples), level, axis=1)
    bounds = np.array([identified_hull(p, e) for p, e in zip(percentiles.T, exact)]).T
    labels = [verdict_label(low, high) for low, high in bounds.T]
    return PowerResult(
        n_studies=n_studies, beta=beta,
        coverage=float(np.mean((bounds[0] <= beta) & (beta <= bounds[1]))),
        verdict_rates={label: labels.count(label) / n_studies for label in VERDICTS},
        declared_growth=float(np.mean([declares_growth(label) for label in labels])),
        median_interval_width=float(np.median(bounds[1] - bounds[0])), n_resamples=n_resamples)
