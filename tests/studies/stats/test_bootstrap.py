"""paired_bootstrap: the multinomial-weight bootstrap over seeds and samples against explicit resampling."""
import math

import numpy as np
import pytest

from orca_lora.studies.stats.bootstrap import bootstrap_interval, replicate_means, seed_se


def brute_force_means(errors: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Each replicate: S seed indices and N sample indices drawn with replacement, the mean of the sub-table."""
    n_seeds, n_samples = errors.shape
    seeds = rng.integers(0, n_seeds, (n_resamples, n_seeds))
    samples = rng.integers(0, n_samples, (n_resamples, n_samples))
    return errors[seeds[:, :, None], samples[:, None, :]].mean(axis=(1, 2))


def test_replicate_means_match_explicit_resampling_in_distribution():
    rng = np.random.default_rng(0)
    # seed effects and sample effects of similar size, so that both draws matter
    errors = 0.3 + 0.05 * rng.standard_normal((4, 1)) + 0.1 * rng.standard_normal((4, 30))
    n = 20000
    fast, = replicate_means([errors], n, seed=1)
    brute = brute_force_means(errors, n, np.random.default_rng(2))
    assert fast.shape == (n,)
    sd = brute.std()
    assert abs(fast.mean() - brute.mean()) < 4 * sd * math.sqrt(2 / n)
    assert fast.std() == pytest.approx(sd, rel=4 / math.sqrt(n / 2))
    # and both are spread as the two-way resampling spreads them, not one way only
    seeds_only = errors.mean(axis=1).std() / math.sqrt(errors.shape[0])
    assert fast.std() > 1.2 * seeds_only
    assert fast.mean() == pytest.approx(errors.mean(), abs=4 * sd / math.sqrt(n))


def test_replicate_means_draw_the_same_seeds_and_samples_for_every_group():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (3, 25))
    first, shifted, scaled = replicate_means([a, a + 0.5, 2 * a], 500, seed=3)
    np.testing.assert_allclose(shifted - first, 0.5)
    np.testing.assert_allclose(scaled, 2 * first)
    assert first.std() > 0.01
    again, = replicate_means([a], 500, seed=3)
    np.testing.assert_allclose(again, first)  # deterministic in the seed
    other, = replicate_means([a], 500, seed=4)
    assert not np.allclose(other, first)


def test_replicate_means_refuse_groups_of_different_shapes():
    with pytest.raises(ValueError, match="share one"):
        replicate_means([np.zeros((2, 5)), np.zeros((2, 6))], 10)
    with pytest.raises(ValueError, match="share one"):
        replicate_means([np.zeros((2, 5)), np.zeros((3, 5))], 10)
    with pytest.raises(ValueError, match="share one"):
        replicate_means([np.zeros(5)], 10)


def test_bootstrap_interval_covers_the_true_mean_and_keeps_pairs():
    rng = np.random.default_rng(4)
    truth = 0.25
    errors = truth + 0.2 * rng.standard_normal((5, 400))
    estimate, low, high = bootstrap_interval(lambda e: e, [errors], n_resamples=999, seed=0)
    assert estimate == pytest.approx(errors.mean())
    assert low < truth < high and low < estimate < high
    se = errors.std() / math.sqrt(errors.size)  # samples dominate: the interval is ~ +- 2 se wide
    assert 2.5 * se < high - low < 8 * se
    # paired groups: the difference of a + 0.1 and a has no spread at all
    difference = bootstrap_interval(lambda a, b: b - a, [errors, errors + 0.1], 199)
    assert difference == pytest.approx((0.1, 0.1, 0.1))
    # a ratio, applied elementwise to the replicate arrays
    ratio, low, high = bootstrap_interval(lambda a, b: b / a, [errors, 3 * errors], 199)
    assert (ratio, low, high) == pytest.approx((3.0, 3.0, 3.0))


def test_bootstrap_interval_without_finite_replicates_is_nan():
    errors = np.full((2, 4), 0.3)
    estimate, low, high = bootstrap_interval(lambda a, b: (a - b) / (a - b), [errors, errors], 50)
    assert math.isnan(estimate) and math.isnan(low) and math.isnan(high)


def test_seed_se_by_hand():
    errors = np.array([[0.1, 0.3], [0.2, 0.4], [0.6, 0.6]])  # per-seed means 0.2, 0.3, 0.6
    sd = math.sqrt(((0.2 - 1.1 / 3) ** 2 + (0.3 - 1.1 / 3) ** 2 + (0.6 - 1.1 / 3) ** 2) / 2)
    assert seed_se(errors) == pytest.approx(sd / math.sqrt(3))
    assert math.isnan(seed_se(np.array([[0.1, 0.2, 0.3]])))
