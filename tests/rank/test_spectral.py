import numpy as np
import pytest
import scipy.linalg
import torch

from orca_lora.rank.spectral import (
    null_extremes,
    spectral_shift_rank,
    wachter_edges,
)

WIDTH = 48


def sample(n, covariance_root, seed, mean=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, covariance_root.shape[0], generator=g, dtype=torch.float64) @ covariance_root.T
    return x if mean is None else x + mean


def random_orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q[:, :k]


def anisotropic_root(d, seed):
    """A square root of a covariance with eigenvalues spread over 0.1..10, random axes."""
    basis = random_orthonormal(d, d, seed)
    return basis * torch.logspace(-0.5, 0.5, d, dtype=torch.float64)


@pytest.mark.parametrize("covariance", ["identity", "anisotropic"])
def test_null_gives_rank_zero_in_95_percent_of_50_trials(covariance):
    n = 4 * WIDTH  # the minimum allowed
    root = torch.eye(WIDTH, dtype=torch.float64) if covariance == "identity" else anisotropic_root(WIDTH, 99)
    ranks = [spectral_shift_rank(sample(n, root, 2 * t), sample(n, root, 2 * t + 1)).rank
             for t in range(50)]
    assert sum(r == 0 for r in ranks) >= 48, ranks


@pytest.mark.parametrize("k", [1, 4, 8])
def test_planted_rank_k_covariance_shift_is_recovered_within_one(k):
    # target covariance I + 5 sum_k u u^T (spike eigenvalue 6) on random orthonormal u; at
    # n = 6 x width (y = 0.17) a lone spike's Fisher-matrix outlier sits near 7.7, the bulk edge
    # near 3.5, the calibrated cut-off near 4 (module docstring); both samples through one
    # anisotropic map. (A spike of 4, outlier near 5.4, lost 2 of 8 in one draw: eight outliers
    # spread and push each other, so the margin must cover their spread, not just one's.)
    n = 6 * WIDTH
    root = anisotropic_root(WIDTH, 7)
    spikes = random_orthonormal(WIDTH, k, 100 + k)
    target_root = torch.eye(WIDTH, dtype=torch.float64) + (6.0 ** 0.5 - 1.0) * spikes @ spikes.T
    for trial in range(5):
        source = sample(n, root, 10 * trial)
        target = sample(n, root @ target_root, 10 * trial + 1)
        result = spectral_shift_rank(source, target)
        assert abs(result.rank - k) <= 1, (trial, result.rank, result.eigenvalues[:k + 2])
        assert not result.mean_shift or result.rank == result.covariance_rank + 1


def test_pure_translation_is_rank_one():
    n = 4 * WIDTH
    root = anisotropic_root(WIDTH, 3)
    shift = 2.0 * random_orthonormal(WIDTH, 1, 5)[:, 0]  # Mahalanobis length 2 along one direction
    result = spectral_shift_rank(sample(n, root, 0), sample(n, root, 1, mean=root @ shift))
    assert result.covariance_rank == 0
    assert result.mean_shift and result.mean_shift_p_value < 1e-6
    assert result.rank == 1


def test_refuses_fewer_than_four_samples_per_dimension():
    x = torch.randn(4 * WIDTH, WIDTH)
    with pytest.raises(ValueError, match=r"n >= 4 x width = 192.*n_t=191.*stage2.max_samples"):
        spectral_shift_rank(x, torch.randn(4 * WIDTH - 1, WIDTH))
    with pytest.raises(ValueError, match="n_s=100"):
        spectral_shift_rank(x[:100], x)


def test_wachter_edges_match_simulated_extremes():
    # extremes fluctuate about the edges on an n^(-2/3) (Tracy-Widom) scale: near the edges in
    # units of the bulk's width, and nearer at twice the size
    gaps = []
    for d, n_s, n_t in [(60, 300, 240), (120, 600, 480)]:
        lower, upper = wachter_edges(d, n_s, n_t)
        smallest, largest = null_extremes(d, n_s, n_t, draws=100, seed=1)
        width = upper - lower
        gaps.append((abs(np.median(largest) - upper) / width, abs(np.median(smallest) - lower) / width))
        assert gaps[-1][0] < 0.1 and gaps[-1][1] < 0.1, (d, gaps[-1])
        assert np.quantile(smallest, 0.001) < lower < np.quantile(smallest, 0.95)
    assert gaps[1][0] < gaps[0][0] and gaps[1][1] < gaps[0][1]
    # and the edges bound the bulk: all null eigenvalues lie within 5% of them
    g = np.random.default_rng(2)
    d, n_s, n_t = 60, 300, 240
    lower, upper = wachter_edges(d, n_s, n_t)
    xs, xt = g.standard_normal((n_s - 1, d)), g.standard_normal((n_t - 1, d))
    values = scipy.linalg.eigh(xt.T @ xt / (n_t - 1), xs.T @ xs / (n_s - 1), eigvals_only=True)
    assert values.min() > 0.95 * lower and values.max() < 1.05 * upper


def test_edges_reduce_to_marchenko_pastur_for_a_known_source():
    lower, upper = wachter_edges(50, 10**9, 200)
    y = 50 / 199
    assert lower == pytest.approx((1 - y**0.5) ** 2, rel=1e-6)
    assert upper == pytest.approx((1 + y**0.5) ** 2, rel=1e-6)


def test_a_layernorm_constraint_is_dropped_not_inverted():
    """Features that sum to zero across channels (a LayerNorm's output) have a singular S_s."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    target = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    source, target = source - source.mean(1, keepdim=True), target - target.mean(1, keepdim=True)
    result = spectral_shift_rank(source, target)
    assert len(result.eigenvalues) == 11 and result.rank == 0


def test_weighted_moments_match_numpy():
    """float32 sums on unit-scale points, float64 sums (single=False) even under a mean shift of 1e4."""
    from orca_lora.rank.spectral import weighted_moments
    g = torch.Generator().manual_seed(0)
    for shift, single, rtol in ((1.0, True, 1e-5), (1e4, False, 1e-6)):
        points = torch.randn(300, 6, generator=g, dtype=torch.float64)
        points[150:] += shift
        counts = torch.zeros(2, 300, dtype=torch.float64)
        counts[0, :150] = 1
        counts[1].scatter_add_(0, torch.randint(0, 150, (150,), generator=g), torch.ones(150, dtype=torch.float64))
        means, covariances = weighted_moments(points, counts, single=single)
        for row in range(2):
            picked = points.repeat_interleave(counts[row].long(), dim=0).numpy()
            np.testing.assert_allclose(means[row].numpy(), picked.mean(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(covariances[row].numpy(), np.cov(picked.T), rtol=rtol, atol=rtol)


def test_batched_ranks_hold_when_the_target_dwarfs_the_source():
    """A target far wider than the source in three directions: at 3e3 the permutation ranks equal one
    exact call per permutation; at 1e5 (float32 sums would make its bootstrap covariances indefinite)
    the batch goes to float64 sums and its bootstrap resamples keep the three directions."""
    from orca_lora.rank.null import _bootstrap_counts, _membership
    from orca_lora.rank.spectral import resampled_spectral_ranks
    for scale in (3e3, 1e5):
        g = torch.Generator().manual_seed(1)
        source = torch.randn(200, 20, generator=g, dtype=torch.float64)
        target = torch.randn(200, 20, generator=g, dtype=torch.float64)
        target[:, :3] *= scale
        counts = _bootstrap_counts(200, 200, 4, torch.Generator().manual_seed(0))
        assert (resampled_spectral_ranks(source, target, *counts, resampled=True) >= 3).all()
        assert spectral_shift_rank(source, target).rank >= 3
    g = torch.Generator().manual_seed(1)
    source = torch.randn(200, 20, generator=g, dtype=torch.float64)
    target = torch.randn(200, 20, generator=g, dtype=torch.float64)
    target[:, :3] *= 3e3
    member = _membership(200, 200, 4, torch.Generator().manual_seed(0))
    pooled = torch.cat([source, target])
    np.testing.assert_array_equal(resampled_spectral_ranks(source, target, member, 1 - member),
                                  [spectral_shift_rank(pooled[row.bool()], pooled[~row.bool()]).rank for row in member])


def test_pair_moments_of_a_permutation_match_both_sides_summed():
    """The target's moments from the total's scatter minus the source's equal summing the target's rows."""
    from orca_lora.rank.null import _membership
    from orca_lora.rank.spectral import pair_moments, weighted_moments
    g = torch.Generator().manual_seed(2)
    points = torch.randn(120, 5, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 5, dtype=torch.float64)
    member = _membership(50, 70, 3, g)
    _, _, target_mean, target_covariance = pair_moments(points, member, 1 - member, single=False)
    summed_mean, summed_covariance = weighted_moments(points, 1 - member, single=False)
    np.testing.assert_allclose(target_mean.numpy(), summed_mean.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(target_covariance.numpy(), summed_covariance.numpy(), rtol=1e-9, atol=1e-12)
