import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.stats import poisson

from orca_lora.rank.ibp import (
    harmonic_number,
    ibp_class_log_prob,
    ibp_kl,
    ibp_log_prob,
    kl_bernoulli,
    kl_gates_given_sticks,
    kl_kumaraswamy_beta1,
    kumaraswamy_log_prob,
    kumaraswamy_log_sample,
    left_order,
    log1mexp,
    log_stick_products,
    relaxed_bernoulli_sample,
    sample_ibp,
    stick_breaking_ibp,
)


def column_values(z):
    """Each column's history as an integer, first row most significant (brute force)."""
    n = z.shape[0]
    return [sum(int(z[i, k]) << (n - 1 - i) for i in range(n)) for k in range(z.shape[1])]


def sequential_prob(z, alpha):
    """P(Z) by running the buffet step by step on Z, whose columns must be in order of first taker."""
    n, k = z.shape
    first = [int(np.argmax(z[:, j])) for j in range(k)]
    assert first == sorted(first), "columns must be in generation order"
    prob, counts, tried = 1.0, np.zeros(k), 0
    for i in range(n):
        for j in range(tried):
            p_take = counts[j] / (i + 1)
            prob *= p_take if z[i, j] else 1.0 - p_take
        n_new = first.count(i)
        prob *= poisson.pmf(n_new, alpha / (i + 1))
        tried += n_new
        counts += z[i]
    return prob


def generation_orders(z):
    """The distinct column permutations of Z that the buffet can output (columns by first taker)."""
    found = set()
    for perm in itertools.permutations(range(z.shape[1])):
        candidate = z[:, perm]
        first = [int(np.argmax(candidate[:, j])) for j in range(z.shape[1])]
        if first == sorted(first):
            found.add(candidate.tobytes())
    return [np.frombuffer(b, dtype=bool).reshape(z.shape) for b in found]


SMALL_MATRICES = [
    np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=bool),
    np.array([[1, 1, 1, 0], [1, 1, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=bool),
    np.array([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 0, 1, 0]], dtype=bool),
    np.array([[1, 0, 0], [0, 1, 1]], dtype=bool),
]


def test_harmonic_number():
    assert harmonic_number(1) == 1.0
    assert harmonic_number(4) == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 4)


def test_left_order_sorts_histories_descending_and_is_idempotent():
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = rng.random((int(rng.integers(1, 7)), int(rng.integers(0, 9)))) < 0.4
        lof = left_order(z)
        values = column_values(lof)
        assert values == sorted(values, reverse=True)
        np.testing.assert_array_equal(left_order(lof), lof)
        assert sorted(map(tuple, lof.T)) == sorted(map(tuple, z.T))


def test_left_order_known_example():
    z = np.array([[0, 1, 1, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(left_order(z), [[1, 1, 0, 0], [1, 0, 1, 0]])


@pytest.mark.parametrize("z", SMALL_MATRICES)
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_ibp_log_prob_matches_step_by_step_buffet(z, alpha):
    generated = z[:, np.argsort(z.argmax(axis=0), kind="stable")]
    assert ibp_log_prob(generated, alpha) == pytest.approx(np.log(sequential_prob(generated, alpha)), rel=1e-10)


@pytest.mark.parametrize("z", SMALL_MATRICES)
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_class_prob_sums_generated_matrices_of_the_class(z, alpha):
    orders = generation_orders(z)
    k1 = np.bincount(z.argmax(axis=0), minlength=z.shape[0])
    k_h = Counter(map(tuple, z.T)).values()
    multiplicity = np.prod([math.factorial(c) for c in k1]) / np.prod([math.factorial(c) for c in k_h])
    assert len(orders) == multiplicity
    assert ibp_class_log_prob(z, alpha) == pytest.approx(ibp_log_prob(z, alpha) + np.log(multiplicity), rel=1e-12)
    total = sum(sequential_prob(order, alpha) for order in orders)
    assert np.exp(ibp_class_log_prob(z, alpha)) == pytest.approx(total, rel=1e-10)


def test_class_prob_is_row_exchangeable_but_generated_prob_is_not():
    rng = np.random.default_rng(1)
    for z in SMALL_MATRICES:
        for _ in range(5):
            permuted = left_order(z[rng.permutation(z.shape[0])])
            assert ibp_class_log_prob(permuted, 1.3) == pytest.approx(ibp_class_log_prob(z, 1.3), rel=1e-12)
    z = np.array([[1, 0], [1, 1]], dtype=bool)
    swapped = left_order(z[::-1])
    assert ibp_log_prob(z, 1.0) - ibp_log_prob(swapped, 1.0) == pytest.approx(np.log(2.0))


def test_class_probs_over_all_classes_sum_to_poisson_cdf_of_k_plus():
    n, alpha, k_max = 3, 0.7, 8
    histories = [np.array(bits, dtype=bool) for bits in itertools.product([0, 1], repeat=n) if any(bits)]
    total = 0.0
    for k in range(k_max + 1):
        for chosen in itertools.combinations_with_replacement(range(len(histories)), k):
            z = np.stack([histories[h] for h in chosen], axis=1) if k else np.zeros((n, 0), dtype=bool)
            total += np.exp(ibp_class_log_prob(z, alpha))
    expected = poisson.cdf(k_max, alpha * harmonic_number(n))
    assert total == pytest.approx(expected, rel=1e-12)
    assert total > 1 - 1e-5


def test_buffet_class_frequencies_match_class_probabilities():
    n, alpha, draws = 3, 1.0, 20000
    rng = np.random.default_rng(2)
    seen = Counter()
    examples = {}
    for _ in range(draws):
        z = sample_ibp(alpha, n, rng)
        key = (z.shape, z.tobytes())
        seen[key] += 1
        examples[key] = z
    checked = 0
    for key, z in examples.items():
        p = np.exp(ibp_class_log_prob(z, alpha))
        if p * draws < 50:
            continue
        standard_error = np.sqrt(p * (1 - p) / draws)
        assert abs(seen[key] / draws - p) < 4 * standard_error, (z.astype(int), seen[key] / draws, p)
        checked += 1
    assert checked >= 10


SAMPLERS = {
    "buffet": lambda alpha, n, rng: sample_ibp(alpha, n, rng),
    "stick_breaking": lambda alpha, n, rng: stick_breaking_ibp(alpha, n, 120, rng),
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_row_counts_poisson_alpha_and_k_plus_poisson_alpha_h_n(sampler):
    alpha, n, draws = 3.0, 8, 3000
    rng = np.random.default_rng(3)
    samples = [SAMPLERS[sampler](alpha, n, rng) for _ in range(draws)]
    for z in samples[:50]:
        assert z.any(axis=0).all()
        np.testing.assert_array_equal(left_order(z), z)
    last_row = np.array([z[-1].sum() for z in samples], dtype=float)
    first_row = np.array([z[0].sum() for z in samples], dtype=float)
    k_plus = np.array([z.shape[1] for z in samples], dtype=float)
    var_se = np.sqrt((alpha + 2 * alpha**2) / draws)  # sd of a Poisson sample variance
    for counts in (first_row, last_row):
        assert abs(counts.mean() - alpha) < 4 * np.sqrt(alpha / draws)
        assert abs(counts.var(ddof=1) - alpha) < 4 * var_se
    rate = alpha * harmonic_number(n)
    assert abs(k_plus.mean() - rate) < 4 * np.sqrt(rate / draws)
    assert abs(k_plus.var(ddof=1) - rate) < 4 * np.sqrt((rate + 2 * rate**2) / draws)


def test_samplers_are_deterministic_given_the_generator():
    for sampler in SAMPLERS.values():
        a = sampler(2.0, 5, np.random.default_rng(7))
        b = sampler(2.0, 5, np.random.default_rng(7))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sample_ibp(0.0, 3, np.random.default_rng(0)), "alpha"),
        (lambda: sample_ibp(1.0, 0, np.random.default_rng(0)), "n_customers"),
        (lambda: stick_breaking_ibp(1.0, 3, 0, np.random.default_rng(0)), "truncation"),
        (lambda: ibp_log_prob(np.array([[1, 0], [1, 0]]), 1.0), "empty columns"),
        (lambda: ibp_class_log_prob(np.array([[2, 1]]), 1.0), "binary"),
        (lambda: left_order(np.ones(3)), "2-D"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sampler_rejects_seed_in_place_of_generator():
    with pytest.raises(TypeError, match="Generator"):
        sample_ibp(1.0, 3, 0)


# The variational part: KLs against Monte Carlo and exact formulas, the samplers


@pytest.mark.parametrize("a,b,alpha", [(1.0, 1.0, 1.0), (2.0, 0.5, 1.0), (0.5, 3.0, 4.0), (3.0, 2.0, 0.3),
                                       (8.0, 1.0, 8.0)])
def test_kumaraswamy_beta_kl_matches_monte_carlo(a, b, alpha):
    n = 400_000
    generator = torch.Generator().manual_seed(0)
    a_t, b_t = torch.full((n,), a, dtype=torch.float64), torch.full((n,), b, dtype=torch.float64)
    v = torch.exp(kumaraswamy_log_sample(a_t, b_t, generator))
    log_ratio = kumaraswamy_log_prob(v, a_t, b_t).numpy() - stats.beta(alpha, 1.0).logpdf(v.numpy())
    estimate, standard_error = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    exact = float(kl_kumaraswamy_beta1(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                       alpha))
    assert abs(exact - estimate) < 4 * standard_error + 1e-4


def test_kumaraswamy_with_b_one_is_the_beta_prior():
    a = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(kl_kumaraswamy_beta1(a, torch.ones(3, dtype=torch.float64), a),
                               torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_kumaraswamy_samples_follow_its_cdf():
    a, b = torch.full((200_000,), 2.5, dtype=torch.float64), torch.full((200_000,), 0.7, dtype=torch.float64)
    v = torch.exp(kumaraswamy_log_sample(a, b, torch.Generator().manual_seed(1))).numpy()
    grid = np.linspace(0.05, 0.95, 10)
    cdf = 1.0 - (1.0 - grid ** 2.5) ** 0.7
    np.testing.assert_allclose((v[:, None] <= grid).mean(axis=0), cdf, atol=5e-3)


def test_bernoulli_kl_is_the_exact_formula():
    q, p = torch.tensor([0.1, 0.5, 0.9, 0.999]), torch.tensor([0.3, 0.5, 0.2, 0.01])
    exact = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    got = kl_bernoulli(q.log(), (1 - q).log(), p.log(), (1 - p).log())
    torch.testing.assert_close(got, exact)
    logits = torch.logit(q.double())
    torch.testing.assert_close(kl_gates_given_sticks(logits, p.double().log()), exact.double(), rtol=1e-5, atol=1e-7)


def test_deep_sticks_stay_finite_for_a_tiny_mass():
    a, b = torch.full((64,), 1e-4, requires_grad=True), torch.ones(64, requires_grad=True)
    logits = torch.zeros(64, requires_grad=True)
    kl = ibp_kl(a, b, logits, alpha=1e-4, generator=torch.Generator().manual_seed(0))
    kl.backward()
    assert torch.isfinite(kl) and all(torch.isfinite(t.grad).all() for t in (a, b, logits))
    assert logits.grad.gt(0).all()  # every gate is pushed shut


def test_stick_products_and_log1mexp():
    v = torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(log_stick_products(v.log()).exp(), torch.cumprod(v, 0))
    x = torch.tensor([-1e-10, -0.1, -2.0, -50.0], dtype=torch.float64)
    reference = torch.tensor([math.log(1e-10), math.log(-math.expm1(-0.1)), math.log(-math.expm1(-2.0)),
                              -math.exp(-50.0)], dtype=torch.float64)  # log(1 - e^x) ~ -e^x far below 0
    torch.testing.assert_close(log1mexp(x), reference, rtol=1e-6, atol=0)


def test_relaxed_bernoulli_becomes_bernoulli_at_low_temperature():
    logits = torch.full((100_000,), math.log(0.3 / 0.7))
    generator = torch.Generator().manual_seed(2)
    cold = relaxed_bernoulli_sample(logits, 0.01, generator)
    assert ((cold < 0.01) | (cold > 0.99)).float().mean() > 0.97  # nearly binary
    assert abs(cold.mean().item() - 0.3) < 0.01  # with the Bernoulli's mean
    warm = relaxed_bernoulli_sample(logits, 2.0 / 3.0, generator)
    assert abs((warm > 0.5).float().mean().item() - 0.3) < 0.01  # P(z > 1/2) = q at any temperature
    with pytest.raises(ValueError, match="temperature must be > 0"):
        relaxed_bernoulli_sample(logits, 0.0)


def test_torch_stick_products_match_the_buffet_samplers_feature_count():
    """E[sum_k pi_k] for v ~ Beta(alpha, 1) through log_stick_products equals the mean number of dishes
    one customer takes in the numpy stick-breaking sampler, and the exact sum_k (alpha / (1 + alpha))^k."""
    alpha, truncation = 3.0, 40
    torch.manual_seed(0)
    v = torch.distributions.Beta(alpha, 1.0).sample((20000, truncation))
    torch_mean = log_stick_products(torch.log(v)).exp().sum(1).mean().item()
    rng = np.random.default_rng(0)
    sampler_mean = np.mean([stick_breaking_ibp(alpha, 1, truncation, rng).shape[1] for _ in range(4000)])
    exact = sum((alpha / (1 + alpha)) ** k for k in range(1, truncation + 1))
    assert torch_mean == pytest.approx(exact, rel=0.02)
    assert sampler_mean == pytest.approx(exact, rel=0.05)
