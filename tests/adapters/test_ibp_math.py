"""The variational IBP's math: the closed-form KLs against Monte Carlo and the exact formula, the
Kumaraswamy sampler against its density, the relaxed Bernoulli's low-temperature limit."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from orca_lora.adapters.ibp_math import (
    ibp_kl,
    kl_bernoulli,
    kl_gates_given_sticks,
    kl_kumaraswamy_beta1,
    kumaraswamy_log_prob,
    kumaraswamy_log_sample,
    log1mexp,
    log_stick_products,
    relaxed_bernoulli_sample,
)


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
