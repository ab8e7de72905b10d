"""Acceptance: at the measured noise, the interval of beta covers a planted proportional law, and a
planted null is not declared to grow (100 seeded studies each, 199 bootstrap replicates a study)."""
import numpy as np

from orca_lora.studies.power import gain_shape, simulate_power, synthetic_curves
from orca_lora.studies.rank_threshold import smallest_sufficient_rank

RANKS = np.array([1, 2, 4, 8, 16, 32])


def test_noiseless_curve_crosses_at_rho():
    for rho, expected in [(0.8, 1), (1.5, 2), (5.7, 8), (8.0, 8), (20.0, 32), (40.0, 32)]:
        curve = 0.1 + 0.03 * gain_shape(RANKS, rho)
        assert smallest_sufficient_rank(RANKS, curve[None, :, None]) == expected


def test_simulation_is_deterministic_in_seed():
    a = synthetic_curves(1.0, np.random.default_rng(5))
    b = synthetic_curves(1.0, np.random.default_rng(5))
    assert all(np.array_equal(x.errors, y.errors) for x, y in zip(a, b))
    assert a[0].errors.shape == (3, 6, 128) and len(a) == 8


def test_planted_proportional_law_is_covered():
    result = simulate_power(1.0, n_studies=100, seed=0)
    assert result.coverage >= 0.90, result


def test_planted_null_is_not_declared_to_grow():
    result = simulate_power(0.0, n_studies=100, seed=1)
    assert result.declared_growth <= 0.10, result
