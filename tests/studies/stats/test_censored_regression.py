"""exact_line_slopes against a brute force (for each b on a fine grid, does an intercept meet every interval?), and
the inference on a set-identified slope (its interval, its p-values)."""
import numpy as np
import pytest

from orca_lora.studies.stats.bootstrap import bootstrap_p_value
from orca_lora.studies.stats.censored_regression import exact_line_slopes, identified_hull, identified_p_value


def feasible(b, x, low, high):
    return np.max(low - b * x) < np.min(high - b * x)


@pytest.mark.parametrize("seed", range(6))
def test_exact_slopes_match_a_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, 4, 5))
    centre = 0.3 + 1.0 * x + rng.normal(0, 0.2, 5)
    low, high = centre - rng.uniform(0.2, 0.8, 5), centre + rng.uniform(0.2, 0.8, 5)
    low[0] = -np.inf  # one-sided, as r* = r_1 is
    grid = np.linspace(-3, 5, 16001)
    allowed = grid[[feasible(b, x, low, high) for b in grid]]
    found = exact_line_slopes(x, low, high)
    if allowed.size == 0:
        assert found is None
    else:
        assert found[0] == pytest.approx(allowed.min(), abs=1e-3) and found[1] == pytest.approx(allowed.max(), abs=1e-3)


def test_the_held_out_laws_intervals_allow_slope_one_and_no_line_meets_crossed_intervals():
    x = np.log2([1.036, 2.075, 4.179, 8.419])
    low, high = np.array([-np.inf, 0.0, np.log2(3), np.log2(7)]), np.array([0.0, 1.0, 2.0, 3.0])
    b_min, b_max = exact_line_slopes(x, low, high)
    assert b_min < 1 < b_max and b_min == pytest.approx(0.93, abs=0.01) and b_max == pytest.approx(1.40, abs=0.01)
    assert exact_line_slopes(np.array([0.0, 0.0]), np.array([0.0, 2.0]), np.array([1.0, 3.0])) is None
    assert exact_line_slopes(np.array([0.0, 1.0]), np.array([-np.inf, -np.inf]), np.array([0.0, 1.0])) == \
        (-np.inf, np.inf)


def test_a_slope_in_the_identified_set_is_not_rejected():
    """p = 1 for a slope that an exact line allows (the plan's amendment of 21:42); the bootstrap's p elsewhere."""
    replicates = np.full(99, 1.2)  # every replicate at one point of the set: its own p for beta = 1 is 0.02
    assert bootstrap_p_value(replicates, 1.0) == pytest.approx(0.02)
    assert identified_p_value(replicates, 1.0, (0.93, 1.40)) == 1.0
    assert identified_p_value(replicates, 0.0, (0.93, 1.40)) == bootstrap_p_value(replicates, 0.0)
    assert identified_p_value(replicates, 1.0, None) == bootstrap_p_value(replicates, 1.0)
    assert identified_hull((1.1, 1.38), (0.93, 1.40)) == (0.93, 1.40)
    assert identified_hull((1.1, 1.38), None) == (1.1, 1.38)
