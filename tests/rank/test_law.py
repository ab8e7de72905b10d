import math

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import PoissonRegressor

from orca_lora.rank.law import RankObservation, fit_rank_law, floor_units, leave_one_task_out_error, log_likelihood


def simulated(c, beta, n_tasks=8, blocks=6, cap=64, seed=0):
    rng = np.random.default_rng(seed)
    observations = []
    for task in range(n_tasks):
        for block in range(blocks):
            x = float(rng.uniform(1, 30))
            rank = int(min(rng.poisson(c * x ** beta), cap))
            observations.append(RankObservation(f"t{task}", f"b{block}", x, rank, cap))
    return observations


def test_log_likelihood_is_the_poisson_sum_with_censored_tails():
    observations = [RankObservation("a", "0", 2.0, 3, 8), RankObservation("a", "1", 5.0, 8, 8),
                    RankObservation("b", "0", 1.0, 0, 8)]
    c, beta = 1.5, 0.7
    expected = 0.0
    for o in observations:
        rate = c * o.x ** beta
        if o.rank >= o.cap:
            expected += math.log(1 - sum(math.exp(-rate) * rate ** k / math.factorial(k) for k in range(o.cap)))
        else:
            expected += o.rank * math.log(rate) - rate - math.log(math.factorial(o.rank))
    assert log_likelihood(math.log(c), beta, observations) == pytest.approx(expected, rel=1e-10)


def test_uncensored_fit_equals_scikit_learns_poisson_regression():
    observations = simulated(2.0, 0.6, cap=10_000)
    law = fit_rank_law(observations)
    reference = PoissonRegressor(alpha=0.0, tol=1e-10, max_iter=1000).fit(
        np.log([[o.x] for o in observations]), [o.rank for o in observations])
    assert law.beta == pytest.approx(reference.coef_[0], abs=1e-4)
    assert math.log(law.c) == pytest.approx(reference.intercept_, abs=1e-4)
    assert law.n_censored == 0


def test_profile_interval_covers_the_planted_law_and_the_tests_read_it():
    law = fit_rank_law(simulated(0.8, 1.0, seed=1))
    assert law.beta_low < 1.0 < law.beta_high
    assert law.p_beta_0 < 1e-6 and law.p_beta_1 > 0.01
    flat = fit_rank_law(simulated(6.0, 0.0, seed=2))
    assert flat.beta_low < 0.0 < flat.beta_high and flat.p_beta_0 > 0.01 and flat.p_beta_1 < 1e-6


def test_profile_interval_has_the_likelihood_ratio_coverage_cut():
    observations = simulated(1.0, 0.5, seed=3)
    law = fit_rank_law(observations)
    cut = stats.chi2.ppf(0.95, 1) / 2
    for bound in (law.beta_low, law.beta_high):
        best_c = max(log_likelihood(lc, bound, observations) for lc in np.linspace(-3, 3, 6001))
        assert law.log_likelihood - best_c == pytest.approx(cut, abs=2e-3)


def test_censoring_keeps_the_fit_unbiased_where_treating_caps_as_exact_does_not():
    observations = simulated(1.0, 1.0, n_tasks=20, cap=12, seed=4)
    assert sum(o.censored for o in observations) > 20
    law = fit_rank_law(observations)
    naive = fit_rank_law([RankObservation(o.task, o.block, o.x, o.rank, 10_000) for o in observations])
    assert law.beta_low < 1.0 < law.beta_high
    assert naive.beta < law.beta - 0.1


def test_leave_one_task_out_predicts_an_exact_law_exactly():
    # ranks that are exactly 2 x, uncensored: every refit recovers them up to the Poisson MLE's bias (none here)
    observations = [RankObservation(f"t{t}", f"b{b}", x, int(2 * x), 1000)
                    for t in range(4) for b, x in enumerate((1.0, 2.0, 4.0, 8.0))]
    assert leave_one_task_out_error(observations) == pytest.approx(0.0, abs=1e-3)
    assert math.isnan(leave_one_task_out_error([o for o in observations if o.task == "t0"]))


def test_floor_units_and_bad_input():
    assert floor_units(1.5, 1.5) == 2.0 and floor_units(0.0, 0.4) == 1.0
    with pytest.raises(ValueError, match="floor, which must be > 0"):
        floor_units(1.0, 0.0)
    with pytest.raises(ValueError, match=">= 3"):
        fit_rank_law(simulated(1.0, 1.0)[:2])
    with pytest.raises(ValueError, match="same gap x"):
        fit_rank_law([RankObservation("a", str(b), 2.0, b, 10) for b in range(4)])
