"""The variational IBP's tensor math (DESIGN.md 6, item 2), pure PyTorch: stick-breaking, the
Kumaraswamy posterior on the sticks, the relaxed Bernoulli on the gates, and the ELBO's KL terms.

Prior (Teh, Gorur & Ghahramani 2007): v_j ~ Beta(alpha, 1), pi_k = prod_{j<=k} v_j, z_k ~ Bernoulli(pi_k).
Posterior (Nalisnick & Smyth 2017; Singh et al. 2017; Kessler et al. 2021): q(v_j) = Kumaraswamy(a_j, b_j),
whose inverse CDF gives reparametrised samples, and q(z_k) = Bernoulli(q_k) relaxed to the binary
Concrete (Maddison et al. 2017; Jang et al. 2017) for the likelihood term. Everything runs in log
space, so deep sticks (log pi_k of -1e4 for a tiny alpha) neither underflow nor give NaN gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

EULER_GAMMA = 0.5772156649015329
_UNIFORM_EPS = 1e-6  # uniforms kept in [eps, 1 - eps]: log u and log(1 - u) stay finite


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2."""
    x = x.clamp(max=-1e-12)  # x = 0 would be log 0
    near_zero = x > -math.log(2.0)
    # each branch sees only inputs it is accurate on: torch.where passes the unused branch's NaN
    # gradients (log1p(-1) at x -> 0) through to x otherwise
    near = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, near, far)


def log_stick_products(log_v: Tensor) -> Tensor:
    """log pi_k = sum_{j<=k} log v_j along the last dimension (stick-breaking, Teh et al. 2007)."""
    return torch.cumsum(log_v, dim=-1)


def _uniform(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device="cpu" if generator else like.device)
    return u.to(like.device).clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)


def kumaraswamy_log_sample(a: Tensor, b: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """log v for one reparametrised v ~ Kumaraswamy(a, b) per entry of a and b.

    The inverse CDF, v = (1 - (1 - u)^(1/b))^(1/a) with u ~ U(0, 1), in logs:
    log v = log1mexp(log(1 - u) / b) / a, differentiable in a and b.
    """
    u = _uniform(a.shape, a, generator)
    return log1mexp(torch.log1p(-u) / b) / a


def kumaraswamy_log_prob(v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """log f(v) = log a + log b + (a - 1) log v + (b - 1) log(1 - v^a) (Kumaraswamy 1980)."""
    log_v = torch.log(v)
    return torch.log(a) + torch.log(b) + (a - 1) * log_v + (b - 1) * log1mexp(a * log_v)


def kl_kumaraswamy_beta1(a: Tensor, b: Tensor, alpha: Tensor | float) -> Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)) per entry, in closed form.

    Nalisnick & Smyth 2017 (appendix), for a Beta(alpha, beta) prior:

        KL = (a - alpha) / a (-gamma - psi(b) - 1/b) + log(a b) + log B(alpha, beta) - (b - 1) / b
             + (beta - 1) b sum_{m>=1} B(m / a, b) / (m + a b),

    gamma the Euler-Mascheroni constant, psi the digamma function. They truncate the infinite series
    at its first terms (10 in their code); the IBP prior has beta = 1, where the series' factor
    (beta - 1) is zero, so the expression is exact with no truncation at all (order 0), and
    log B(alpha, 1) = -log alpha. psi is torch.digamma, exact too. Checked against Monte Carlo in
    tests/adapters/test_ibp_math.py.
    """
    alpha = torch.as_tensor(alpha, dtype=a.dtype, device=a.device)
    return ((a - alpha) / a * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
            + torch.log(a * b) - torch.log(alpha) - (b - 1.0) / b)


def kl_bernoulli(log_q: Tensor, log_1mq: Tensor, log_p: Tensor, log_1mp: Tensor) -> Tensor:
    """KL(Bernoulli(q) || Bernoulli(p)) = q log(q / p) + (1 - q) log((1 - q) / (1 - p)), from logs
    (q = 0 or 1 gives the limit, since q log q -> 0)."""
    q = torch.exp(log_q)
    return q * (log_q - log_p) + (1.0 - q) * (log_1mq - log_1mp)


def kl_gates_given_sticks(logits: Tensor, log_pi: Tensor) -> Tensor:
    """KL(Bernoulli(sigmoid(logits)) || Bernoulli(pi)) per gate, with pi given by log pi."""
    return kl_bernoulli(F.logsigmoid(logits), F.logsigmoid(-logits), log_pi, log1mexp(log_pi))


def relaxed_bernoulli_sample(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """z = sigmoid((logits + log u - log(1 - u)) / temperature), u ~ U(0, 1): the binary Concrete
    (Maddison et al. 2017, eq. 21), a reparametrised relaxation of Bernoulli(sigmoid(logits)); as the
    temperature goes to 0 its samples become Bernoulli draws, P(z > 1/2) = sigmoid(logits) at any
    temperature."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = _uniform(logits.shape, logits, generator)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def ibp_kl(a: Tensor, b: Tensor, logits: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """The ELBO's KL for one set of K sticks and gates (a, b, logits of shape (K,)), a scalar:

        KL(q(v) || prod_j Beta(alpha, 1)) + E_q(v)[sum_k KL(q(z_k) || Bernoulli(pi_k))],

    the first in closed form (kl_kumaraswamy_beta1), the expectation from one reparametrised sample
    of v. Call with alpha > 0 (the layer clamps a prior mass of 0 to a small epsilon first).
    """
    log_pi = log_stick_products(kumaraswamy_log_sample(a, b, generator))
    return kl_kumaraswamy_beta1(a, b, alpha).sum() + kl_gates_given_sticks(logits, log_pi).sum()
