"""Acceptance: at the measured noise, the interval of beta covers a planted proportional law, and a
planted null is not declared to grow (100 seeded studies each, 199 bootstrap replicates a study), under the
plan's primary rule (the log-gain r*, with rank 0)."""
import numpy as np
import pytest

from orca_lora.studies.power import gain_shape, noiseless_curve, simulate_power, synthetic_curves
from orca_lora.studies.rank_threshold import smallest_sufficient_rank

RANKS = np.array([1, 2, 4, 8, 16, 32])
CROSSINGS = [(0.8, 1), (1.5, 2), (5.7, 8), (8.0, 8), (20.0, 32), (40.0, 32)]


def test_noiseless_gain_curve_crosses_at_rho():
    for rho, expected in CROSSINGS:
        curve = 0.1 + 0.03 * gain_shape(RANKS, rho)
        assert smallest_sufficient_rank(RANKS, curve[None, :, None]) == expected


def test_noiseless_log_gain_curve_crosses_at_rho():
    """The log-gain rule (tolerance e_best (e(0) / e_best)^0.1) on ln e(r) = ln e_inf + ln 2 q(r), q(r_min) = 0.5."""
    for rho, expected in CROSSINGS:
        curve, reference = noiseless_curve(RANKS, rho, 0.1, 0.1, 0.03, 2.0, 0.5)
        assert reference == pytest.approx(0.2)
        assert smallest_sufficient_rank(RANKS, curve[None, :, None], 0.1, np.full((1, 1), reference)) == expected
        fraction = np.log(curve / curve.min()) / np.log(reference / curve.min())  # brute force: share of log gain
        assert int(RANKS[np.argmax(fraction <= 0.1 + 1e-12)]) == expected


def test_simulation_is_deterministic_in_seed():
    a = synthetic_curves(1.0, np.random.default_rng(5))
    b = synthetic_curves(1.0, np.random.default_rng(5))
    assert all(np.array_equal(x.errors, y.errors) and np.array_equal(x.unadapted, y.unadapted) for x, y in zip(a, b))
    assert a[0].errors.shape == (3, 6, 128) and a[0].unadapted.shape == (3, 128) and len(a) == 8
    assert synthetic_curves(1.0, np.random.default_rng(5), unadapted_ratio=None)[0].unadapted is None


def test_planted_proportional_law_is_covered():
    result = simulate_power(1.0, n_studies=100, seed=0)
    assert result.coverage >= 0.90, result


def test_planted_null_is_not_declared_to_grow():
    result = simulate_power(0.0, n_studies=100, seed=1)
    assert result.declared_growth <= 0.10, result
