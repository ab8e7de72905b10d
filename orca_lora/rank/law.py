"""A fitted rank law P(r | D): r ~ Poisson(c x^beta), x the gap in units of its noise floor (README, "P(r | D)").

Observations are (task, block, x, r, cap): r a rank the data asked for (IBP-LoRA's posterior rank,
its block's median over modules), cap the largest rank the run could report (its truncation r_max);
an observation with r >= cap is right-censored: it only says R >= cap. The gap enters as

    x = 1 + max(D - floor, 0) / floor  (= max(D, floor) / floor; 1 where p >= 0.05),

the floor-corrected gap of `rank/null.py` in units of the floor, so that a gap at its floor reads
x = 1 (and log x = 0) and twice the floor reads 2. With
lambda = c x^beta, the log-likelihood (Poisson regression of r on log x, Cameron & Trivedi 2013,
"Regression Analysis of Count Data", ch. 3; censoring as in their sec. 4.3) is

    l(c, beta) = sum_uncensored [r log lambda - lambda - log r!] + sum_censored log P(R >= cap | lambda).

beta = 1 is the seed's hypothesis (rank proportional to the gap), beta = 0 its null (rank free of
the gap). The interval for beta is the profile-likelihood interval {beta : 2 (l_max - l_p(beta)) <=
chi2_1(0.95)}, the tests are likelihood-ratio tests on one degree of freedom, and the prediction
error is leave-one-task-out: refit without a task, predict its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize, stats

LEVEL = 0.95
_BETA_SEARCH = 20.0  # |beta| beyond which the interval is reported as unbounded


@dataclass(frozen=True)
class RankObservation:
    task: str
    block: str
    x: float  # 1 + corrected gap / floor >= 1
    rank: int  # the rank the data asked for
    cap: int  # the largest rank observable; rank >= cap is right-censored

    @property
    def censored(self) -> bool:
        return self.rank >= self.cap


@dataclass(frozen=True)
class RankLaw:
    """lambda(x) = c x^beta, with beta's profile interval, the two likelihood-ratio tests and the
    leave-one-task-out error (mean absolute rank error over held-out blocks; NaN with one task)."""

    c: float
    beta: float
    beta_low: float  # -inf / inf when the profile does not close within |beta| <= 20
    beta_high: float
    p_beta_0: float
    p_beta_1: float
    log_likelihood: float
    leave_one_task_out_error: float
    n_observations: int
    n_tasks: int
    n_censored: int

    def rate(self, x: np.ndarray | float) -> np.ndarray:
        return self.c * np.asarray(x, dtype=float) ** self.beta


def floor_units(corrected_gap: float, floor: float) -> float:
    """x = 1 + corrected / floor: the floor-corrected gap in units of its noise floor, 1 at the floor."""
    if not floor > 0:
        raise ValueError(f"a rank law reads the gap in units of its floor, which must be > 0, got {floor}")
    return 1.0 + max(corrected_gap, 0.0) / floor


def log_likelihood(log_c: float, beta: float, observations: Sequence[RankObservation]) -> float:
    """l(c, beta) of the module docstring, right-censored where rank >= cap."""
    x = np.array([o.x for o in observations])
    ranks = np.array([o.rank for o in observations])
    caps = np.array([o.cap for o in observations])
    censored = ranks >= caps
    rates = np.exp(log_c + beta * np.log(x))
    exact = stats.poisson.logpmf(ranks[~censored], rates[~censored]).sum()
    tail = stats.poisson.logsf(caps[censored] - 1, rates[censored]).sum()
    return float(exact + tail)


def _fit(observations: Sequence[RankObservation], beta: float | None = None) -> tuple[float, float, float]:
    """(log c, beta, l) maximising l, with beta held at `beta` when given."""
    start = np.log(max(np.mean([o.rank for o in observations]), 0.5))
    if beta is not None:
        best = optimize.minimize_scalar(lambda log_c: -log_likelihood(log_c, beta, observations),
                                        bracket=(start - 1.0, start + 1.0))
        return float(best.x), beta, float(-best.fun)
    best = optimize.minimize(lambda p: -log_likelihood(p[0], p[1], observations), x0=[start, 0.0],
                             method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
    return float(best.x[0]), float(best.x[1]), float(-best.fun)


def _profile_bound(observations: Sequence[RankObservation], beta_hat: float, l_max: float, direction: float) -> float:
    cut = stats.chi2.ppf(LEVEL, 1) / 2

    def excess(beta: float) -> float:
        return l_max - _fit(observations, beta)[2] - cut

    edge = beta_hat + direction * _BETA_SEARCH
    if excess(edge) < 0:
        return direction * np.inf
    return float(optimize.brentq(excess, *sorted((beta_hat, edge)), xtol=1e-6))


def check_observations(observations: Sequence[RankObservation]) -> None:
    if len(observations) < 3:
        raise ValueError(f"a rank law needs >= 3 (task, block) observations, got {len(observations)}")
    if len({o.x for o in observations}) < 2:
        raise ValueError("every observation has the same gap x, so beta is not identified; calibrate on tasks "
                         "or blocks whose gaps differ")
    for o in observations:
        if not (o.x >= 1 and o.rank >= 0 and o.cap >= 1):
            raise ValueError(f"observation {o} must have x >= 1, rank >= 0 and cap >= 1")


def fit_rank_law(observations: Sequence[RankObservation]) -> RankLaw:
    """Maximum-likelihood c and beta, beta's profile interval, the tests beta = 0 and beta = 1 and
    the leave-one-task-out error (module docstring)."""
    check_observations(observations)
    log_c, beta, l_max = _fit(observations)
    p_values = [float(stats.chi2.sf(max(2 * (l_max - _fit(observations, b)[2]), 0.0), 1)) for b in (0.0, 1.0)]
    tasks = sorted({o.task for o in observations})
    return RankLaw(float(np.exp(log_c)), beta, _profile_bound(observations, beta, l_max, -1.0),
                   _profile_bound(observations, beta, l_max, 1.0), p_values[0], p_values[1], l_max,
                   leave_one_task_out_error(observations), len(observations), len(tasks),
                   sum(o.censored for o in observations))


def leave_one_task_out_error(observations: Sequence[RankObservation]) -> float:
    """Mean |predicted - observed| over every block, each task's blocks predicted by the law fitted
    on the other tasks (prediction: the Poisson mean, capped at the block's cap; a censored block
    counts only a shortfall below its cap). NaN with fewer than two tasks."""
    tasks = sorted({o.task for o in observations})
    errors = []
    for task in tasks:
        rest = [o for o in observations if o.task != task]
        if len(rest) < 2 or len({o.x for o in rest}) < 2:
            return float("nan")
        log_c, beta, _ = _fit(rest)
        for o in (o for o in observations if o.task == task):
            predicted = min(np.exp(log_c) * o.x ** beta, o.cap)
            errors.append(max(o.cap - predicted, 0.0) if o.censored else abs(predicted - o.rank))
    return float(np.mean(errors)) if errors else float("nan")
