import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from orca_lora.align.distances import gaussian_kernel, median_bandwidths, mmd2
from orca_lora.align.features import squared_distances
from orca_lora.rank.null import (
    GapEstimate,
    _membership,
    c2st_test,
    corrected_gap,
    mmd_gap,
    otdd_gap,
    permutation_p_value,
    resampled_gap,
    spectral_gap,
    stratified_halves,
    weighted_mmd2,
)
from orca_lora.rank.spectral import resampled_spectral_ranks, spectral_shift_rank


def gaussians(n: int, width: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0, I) against N(shift e_1, I), standardised by the source's own statistics."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(n, width, generator=generator, dtype=torch.float64)
    target = torch.randn(n, width, generator=generator, dtype=torch.float64)
    target[:, 0] += shift
    mean, std = source.mean(0), source.std(0)
    return (source - mean) / std, (target - mean) / std


def source_scaled_mmd(source: torch.Tensor, target: torch.Tensor, seed: int, **draws) -> GapEstimate:
    bandwidths = median_bandwidths(source, source)
    return mmd_gap(source, target, bandwidths, float(bandwidths[2]) ** 2, torch.Generator().manual_seed(seed),
                   **draws)


def test_weighted_mmd2_with_membership_weights_is_the_unbiased_mmd2():
    source, target = gaussians(30, 5, 1.0, seed=0)
    bandwidths = median_bandwidths(source, target)
    pooled = torch.cat([source, target])
    kernel = gaussian_kernel(squared_distances(pooled, pooled), bandwidths)
    member = torch.cat([torch.ones(30), torch.zeros(30)]).double()[None]
    torch.testing.assert_close(weighted_mmd2(kernel, member, 1 - member)[0], mmd2(source, target, bandwidths=bandwidths))


def test_weighted_mmd2_with_bootstrap_counts_leaves_out_pairs_of_one_point():
    """Brute force: expand the resampled points and average k over pairs from different originals."""
    generator = torch.Generator().manual_seed(1)
    pooled = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    kernel = gaussian_kernel(squared_distances(pooled, pooled), torch.tensor([0.7, 1.5], dtype=torch.float64))
    picks_s, picks_t = [0, 0, 2, 3, 3, 3], [5, 6, 6, 8, 8]
    counts_s = torch.bincount(torch.tensor(picks_s), minlength=9).double()[None]
    counts_t = torch.bincount(torch.tensor(picks_t), minlength=9).double()[None]

    def within(picks):
        pairs = [(i, j) for i, j in itertools.product(picks, picks) if i != j]
        return sum(float(kernel[i, j]) for i, j in pairs) / len(pairs)

    cross = sum(float(kernel[i, j]) for i, j in itertools.product(picks_s, picks_t)) / (len(picks_s) * len(picks_t))
    expected = within(picks_s) + within(picks_t) - 2 * cross
    assert float(weighted_mmd2(kernel, counts_s, counts_t)[0]) == pytest.approx(expected, rel=1e-12)


def test_permutation_p_value_counts_the_observation_itself():
    assert permutation_p_value(2.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(3 / 4)
    assert permutation_p_value(9.0, np.zeros(199)) == pytest.approx(1 / 200)


def test_mmd_null_rejects_at_about_its_level_and_a_shift_clears_the_floor():
    rejected = sum(source_scaled_mmd(*gaussians(40, 8, 0.0, seed), seed=seed, permutations=99,
                                     bootstraps=20).p_value < 0.05 for seed in range(40))
    assert rejected <= 6, f"{rejected} of 40 null trials rejected at 0.05"
    shifted = source_scaled_mmd(*gaussians(80, 8, 1.5, seed=0), seed=0)
    assert shifted.p_value < 0.01 and shifted.gap > shifted.floor
    assert shifted.ci_low < shifted.gap < shifted.ci_high


def test_negative_mmd_is_kept_and_reads_as_no_gap():
    estimates = [source_scaled_mmd(*gaussians(40, 8, 0.0, seed), seed=seed, permutations=50, bootstraps=20)
                 for seed in range(10)]
    assert min(e.gap for e in estimates) < 0, "an unbiased estimate dips below 0 at the null"
    assert all(corrected_gap(e) == 0.0 for e in estimates if e.gap < 0)


def test_source_scaled_mmd_is_comparable_across_widths_where_raw_mmd_is_not():
    """At a fixed Mahalanobis shift of 2, raw MMD^2 falls with width; times m0^2 it does not."""
    scaled, raw = {}, {}
    for width in (48, 192):
        estimates = []
        for seed in range(3):
            source, target = gaussians(200, width, 2.0, seed)
            bandwidths = median_bandwidths(source, source)
            estimates.append((float(mmd2(source, target, bandwidths=bandwidths)),
                              source_scaled_mmd(source, target, seed, permutations=20, bootstraps=20).gap))
        raw[width], scaled[width] = np.mean([e[0] for e in estimates]), np.mean([e[1] for e in estimates])
    assert raw[48] / raw[192] > 2.5
    assert 0.75 < scaled[48] / scaled[192] < 1.33


def test_corrected_gap_subtracts_the_floor_and_zeroes_what_is_not_significant():
    assert corrected_gap(GapEstimate(3.0, 1.0, 0.01, 2.0, 4.0)) == 2.0
    assert corrected_gap(GapEstimate(3.0, 1.0, 0.2, 2.0, 4.0)) == 0.0
    assert corrected_gap(GapEstimate(0.5, 1.0, 0.01, 0.0, 1.0)) == 0.0


def test_resampled_gap_matches_a_by_hand_permutation_null():
    source, target = gaussians(12, 3, 1.0, seed=2)
    labels = torch.zeros(12, dtype=torch.long)

    def mean_shift(x_s, y_s, x_t, y_t):
        return float((x_s.mean(0) - x_t.mean(0)).norm())

    estimate = resampled_gap(mean_shift, source, labels, target, labels, torch.Generator().manual_seed(4),
                             permutations=30, bootstraps=30)
    generator, pooled = torch.Generator().manual_seed(4), torch.cat([source, target])
    null = []
    for _ in range(30):
        order = torch.randperm(24, generator=generator)
        null.append(mean_shift(pooled[order[:12]], None, pooled[order[12:]], None))
    assert estimate.gap == mean_shift(source, None, target, None)
    assert estimate.floor == pytest.approx(np.quantile(null, 0.95))
    assert estimate.p_value == permutation_p_value(estimate.gap, np.array(null))


def test_otdd_gap_subtracts_its_growing_source_vs_source_bias():
    labels = torch.arange(64) % 2
    options = {"inner": "gaussian", "entropic_reg": 0.1}
    null = otdd_gap(*(lambda s, t: (s, labels, t, labels))(*gaussians(64, 8, 0.0, seed=0)),
                    torch.Generator().manual_seed(0), draws=6, **options)
    assert corrected_gap(null) == 0.0 and abs(null.gap) < null.floor + 1.0
    source, target = gaussians(64, 8, 3.0, seed=0)
    shifted = otdd_gap(source, labels, target, labels, torch.Generator().manual_seed(0), draws=6, **options)
    assert shifted.p_value < 0.2 and shifted.gap > shifted.floor
    # a shift of 3 costs 3^2 in the points' cost and again in the label-to-label W2^2 term
    assert shifted.gap == pytest.approx(18.0, rel=0.3)


def test_c2st_floor_and_p_value_are_the_binomial_null_of_held_out_accuracy():
    source, target = gaussians(50, 4, 0.0, seed=0)
    estimate = c2st_test(source, target, seed=0)
    assert estimate.floor == pytest.approx(2 * (stats.binom.ppf(0.95, 100, 0.5) / 100 - 0.5))
    correct = round((0.5 + estimate.gap / 2) * 100)
    assert estimate.p_value == pytest.approx(stats.binom.sf(correct - 1, 100, 0.5))
    separated = c2st_test(*gaussians(50, 4, 6.0, seed=0), seed=0)
    assert separated.gap > 0.9 and separated.p_value < 1e-6 and corrected_gap(separated) > 0


def test_stratified_halves_are_disjoint_and_keep_every_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    first, second = stratified_halves(labels, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([first, second]).tolist()) == list(range(11))
    assert set(labels[first].tolist()) == set(labels[second].tolist()) == {0, 1, 2, 3}


def test_batched_spectral_ranks_equal_one_call_per_permutation():
    g = torch.Generator().manual_seed(3)
    source, target = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(160, 12, generator=g,
                                                                                          dtype=torch.float64)
    target[:, :2] *= 2.5
    member = _membership(200, 160, 6, torch.Generator().manual_seed(0))
    batched = resampled_spectral_ranks(source, target, member, 1 - member)
    pooled = torch.cat([source, target])
    one_by_one = [spectral_shift_rank(pooled[row.bool()], pooled[~row.bool()]).rank for row in member]
    np.testing.assert_array_equal(batched, one_by_one)


def test_spectral_gap_interval_covers_a_planted_rank_and_the_null_sits_at_zero():
    g = torch.Generator().manual_seed(4)
    source, target = torch.randn(400, 48, generator=g, dtype=torch.float64), torch.randn(400, 48, generator=g,
                                                                                          dtype=torch.float64)
    target[:, :4] *= 6 ** 0.5
    estimate = spectral_gap(source, target, torch.Generator().manual_seed(0), permutations=50, bootstraps=50)
    assert estimate.gap == 4 and estimate.floor == 0 and estimate.ci_low <= 4 <= estimate.ci_high
    assert estimate.p_value < 0.05
    null = spectral_gap(source, torch.randn(400, 48, generator=g, dtype=torch.float64),
                        torch.Generator().manual_seed(0), permutations=50, bootstraps=50)
    assert null.gap == 0 and null.ci_high <= 1
