import math
import warnings

import numpy as np
import ot
import pytest
import torch

from orca_lora.align.sinkhorn import SinkhornCapWarning, _sinkhorn_potentials, entropic_ot


def wide_range_cost(n=40, m=30, seed=0):
    """Squared distances rescaled to [0.6, 28], the issue's 40 x 30 case."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    z = torch.randn(m, 5, generator=g, dtype=torch.float64) + 0.5
    c = torch.cdist(x, z) ** 2
    return 0.6 + (c - c.min()) / (c.max() - c.min()) * (28 - 0.6)


def pot_entropic_value(cost, eps):
    """OT_eps = <P, C> + eps KL(P | a x b) from POT's log-domain Sinkhorn plan, run to 1e-13."""
    a, b = ot.unif(cost.shape[0]), ot.unif(cost.shape[1])
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
    return float(np.sum(plan * cost) + eps * np.sum(plan * np.log(plan / np.outer(a, b))))


def test_small_eps_value_is_within_two_percent_of_exact_ot():
    cost = wide_range_cost()
    exact = ot.emd2(ot.unif(40), ot.unif(30), cost.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkhornCapWarning)
        value = float(entropic_ot(cost, 1e-3, tolerance=1e-3, max_iters=20000))
    assert value == pytest.approx(exact, rel=0.02)


def test_value_matches_pot_log_sinkhorn_at_eps_0_1():
    cost = wide_range_cost()
    value = float(entropic_ot(cost, 0.1, tolerance=1e-9, max_iters=5000))
    assert value == pytest.approx(pot_entropic_value(cost.numpy(), 0.1), rel=1e-6)
    # the default tolerance is already within 1e-4 there
    assert float(entropic_ot(cost, 0.1)) == pytest.approx(value, rel=1e-4)


@pytest.mark.parametrize("tolerance", [1e-3, 1e-6])
def test_returned_plan_meets_the_marginal_tolerance(tolerance):
    cost = wide_range_cost().requires_grad_(True)
    entropic_ot(cost, 0.1, tolerance=tolerance).backward()
    plan = cost.grad  # the gradient in the cost is the plan
    assert float((plan.sum(1) - 1 / 40).abs().sum()) <= tolerance
    assert float((plan.sum(0) - 1 / 30).abs().sum()) <= 1e-10


def test_self_transport_plan_meets_the_tolerance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    cost = (torch.cdist(x, x) ** 2).requires_grad_(True)
    entropic_ot(cost, 0.1, tolerance=1e-7, symmetric=True).backward()
    assert float((cost.grad.sum(1) - 1 / 30).abs().sum()) <= 1e-7


def test_iteration_cap_warns_naming_eps_error_and_cap():
    cost = wide_range_cost()
    with pytest.warns(SinkhornCapWarning, match=r"cap of 3 iterations at eps=0.001.*sinkhorn_max_iters"):
        entropic_ot(cost, 1e-3, max_iters=3)


def test_fixed_fifty_iterations_were_short_of_converged():
    """The issue's finding, kept as a regression: 25 annealing + 25 plain steps (the old fixed
    50) leave a marginal error far above the tolerance at small eps."""
    cost = wide_range_cost()
    log_a, log_b = (torch.full((k,), -math.log(k), dtype=cost.dtype) for k in cost.shape)
    with pytest.warns(SinkhornCapWarning):
        _, _, error = _sinkhorn_potentials(cost, 1e-3, 1e-4, 25, log_a, log_b)
    assert error > 1e-2


@pytest.mark.parametrize("kwargs, match", [({"tolerance": 0.0}, "sinkhorn_tolerance"),
                                           ({"max_iters": 0}, "sinkhorn_max_iters")])
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        entropic_ot(wide_range_cost(), 0.1, **kwargs)
