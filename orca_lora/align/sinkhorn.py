"""Entropic optimal transport between two point clouds given their cost matrix: OTDD's outer problem.

OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b) with uniform weights, solved by log-domain Sinkhorn
with geomloss' annealing schedule (Feydy et al. 2019, "Interpolating between optimal transport and
MMD using Sinkhorn divergences"), then plain alternating updates at the target eps until the
plan's marginal error is below a tolerance (capped, with a warning at the cap). The value's
gradient in the cost is the plan (envelope theorem), attached without differentiating the loop.
"""
import math
import warnings

import numpy as np
import torch
from torch import Tensor

# L1 error of the plan's marginal (a and b sum to 1, so it is relative to the mass). At ORCA's Darcy
# setting (bench_align's features, exact inner, eps 0.1) the loss against a float64 1e-9 solve was
# 2.1e-6 off at 1e-2 and 1.1e-7 at 1e-3 and 1e-4 (float32's floor); 1e-3 reaches that floor in
# ~270 updates there, where 1e-4 takes ~450.
SINKHORN_TOLERANCE = 1e-3
SINKHORN_MAX_ITERS = 1000
ANNEAL_STEPS = 25  # geomloss-style annealing steps before the updates at the target eps


class SinkhornCapWarning(RuntimeWarning):
    """The outer Sinkhorn hit its iteration cap before its marginal error met the tolerance."""


def _with_gradient(value: Tensor, inputs: Tensor, gradient: Tensor) -> Tensor:
    """`value` as a function of `inputs` whose derivative is `gradient`."""
    return value.detach() + (gradient.detach() * (inputs - inputs.detach())).sum()


def _softmin(eps: float, cost: Tensor, log_weights: Tensor, potential: Tensor, dim: int) -> Tensor:
    """Soft c-transform -eps log sum_k w_k exp((p_k - C_ik) / eps), summing over `dim` of cost.

    Terms more than e^-50 below the largest are raised to e^-50, a change far below float
    precision; without it most terms underflow at small eps, and torch.exp on CPU runs its
    underflow path some 40x slower per element.
    """
    shift = (potential / eps + log_weights).unsqueeze(1 - dim)
    scores = torch.sub(shift, cost, alpha=1.0 / eps)
    top = scores.amax(dim, keepdim=True)
    total = (scores - top).clamp_min_(-50.0).exp_().sum(dim)
    return -eps * (top.squeeze(dim) + total.log())


def marginal_error(potential: Tensor, transform: Tensor, eps: float, log_weights: Tensor) -> float:
    """L1 error sum_i w_i |exp((p_i - T(p)_i) / eps) - 1| of the plan's marginal on the side of
    `potential` p, where T(p) is the soft c-transform of the other potential over that side: the
    plan w_i w'_j exp((p_i + q_j - C_ij) / eps) has marginal w_i exp((p_i - T_i) / eps) there."""
    ratio = ((potential - transform) / eps).clamp(max=50.0).exp()
    return float((log_weights.exp() * (ratio - 1.0).abs()).sum())


def _warn_cap(eps: float, error: float, tolerance: float, max_iters: int) -> None:
    warnings.warn(
        f"entropic_ot: Sinkhorn reached its cap of {max_iters} iterations at eps={eps:g} with "
        f"marginal error {error:.2e} > tolerance {tolerance:.1e}; raise sinkhorn_max_iters "
        "(stage1/stage2.sinkhorn_max_iters), loosen sinkhorn_tolerance, or raise entropic_reg",
        SinkhornCapWarning, stacklevel=3,
    )


def _self_potential(cost: Tensor, eps: float, tolerance: float, max_iters: int,
                    log_a: Tensor) -> tuple[Tensor, float]:
    """Potential f = g of a self-transport OT_eps(a, a) (C = C^T): the averaged symmetric update
    f <- (f + T(f)) / 2 of Feydy et al. (2019) at eps, until the plan's marginal error (the same
    on both sides) is <= `tolerance`, at most `max_iters` updates. Without annealing it settles
    in a few iterations, where the two-potential loop needs its annealing schedule. Returns f
    and the reached error."""
    a = log_a.exp()
    f = cost @ a
    f = f - 0.5 * (a @ f)
    for _ in range(max_iters):
        transform = _softmin(eps, cost, log_a, f, dim=1)
        error = marginal_error(f, transform, eps, log_a)
        if error <= tolerance:
            return f, error
        f = 0.5 * (f + transform)
    transform = _softmin(eps, cost, log_a, f, dim=1)
    error = marginal_error(f, transform, eps, log_a)
    if error > tolerance:
        _warn_cap(eps, error, tolerance, max_iters)
    return f, error


def _sinkhorn_potentials(cost: Tensor, eps: float, tolerance: float, max_iters: int, log_a: Tensor,
                         log_b: Tensor) -> tuple[Tensor, Tensor, float]:
    """Dual potentials (f, g) of OT_eps(a, b) and the reached marginal error.

    First `ANNEAL_STEPS` steps: Feydy's annealed symmetric Sinkhorn (2020, Alg. 3.5) on the
    schedule of `geomloss.ot.solve` (eps from the cost range down geometrically, averaged updates
    of f and g). Then alternating Sinkhorn updates at the target eps, which converge there far
    faster than more annealing: after each g-update the column marginal is exact, and the loop
    stops once the row marginal's L1 error is <= `tolerance`, or after `max_iters` updates (with
    a `SinkhornCapWarning`). The returned pair is the one checked: column-exact, row error <= tol.
    """
    a, b = log_a.exp(), log_b.exp()
    # eps = +inf solution, as geomloss starts: f_i = <b, C_i.> - <a, C b> / 2.
    f, g = cost @ b, a @ cost
    f, g = f - 0.5 * (a @ f), g - 0.5 * (b @ g)
    start = max(float(cost.max() - cost.min()), eps)
    for eps_k in np.geomspace(start, eps, ANNEAL_STEPS):
        f_new = _softmin(float(eps_k), cost, log_b, g, dim=1)
        g_new = _softmin(float(eps_k), cost, log_a, f, dim=0)
        f, g = 0.5 * (f + f_new), 0.5 * (g + g_new)
    f = _softmin(eps, cost, log_b, g, dim=1)
    error = math.inf
    for _ in range(max_iters):
        g = _softmin(eps, cost, log_a, f, dim=0)
        f_next = _softmin(eps, cost, log_b, g, dim=1)
        error = marginal_error(f, f_next, eps, log_a)
        if error <= tolerance:
            return f, g, error
        f = f_next
    g = _softmin(eps, cost, log_a, f, dim=0)
    error = marginal_error(f, _softmin(eps, cost, log_b, g, dim=1), eps, log_a)
    if error > tolerance:
        _warn_cap(eps, error, tolerance, max_iters)
    return f, g, error


def check_sinkhorn_options(tolerance: float, max_iters: int) -> None:
    if not tolerance > 0:
        raise ValueError(f"sinkhorn_tolerance must be > 0, got {tolerance}")
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"sinkhorn_max_iters must be an integer >= 1, got {max_iters}")


def entropic_ot(
    cost: Tensor,
    entropic_reg: float,
    tolerance: float = SINKHORN_TOLERANCE,
    max_iters: int = SINKHORN_MAX_ITERS,
    symmetric: bool = False,
) -> Tensor:
    """OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b) over couplings of uniform weights a, b.

    eps = `entropic_reg`, in the units of the cost, which in `otdd` is the full squared distance
    ||x - x'||^2 + W2^2. geomloss conversion: SamplesLoss(p=2, blur=s, cost=|x - y|^2) has
    eps = s^2; with its default halved cost |x - y|^2 / 2 (also otdd's p=2 routine),
    SamplesLoss(blur=s) = OT_{2 s^2}(C) / 2 in these units. Solved by log-domain Sinkhorn
    (`_sinkhorn_potentials`) until the plan's marginal L1 error is <= `tolerance`, at most
    `max_iters` iterations after the annealing (a `SinkhornCapWarning` names the cap when hit);
    the value is the dual <a, f> + <b, g>. `symmetric` marks a self-transport cost (C = C^T,
    a = b), solved by `_self_potential` to the same tolerance and cap. No gradient through the
    loop: the gradient in `cost` is the plan a_i b_j exp((f_i + g_j - C_ij) / eps) (envelope
    theorem). Not geomloss.ot.solve: in geomloss 0.3.1 its `.value` backpropagates twice the
    plan, and its softmin runs torch.exp's slow underflow path.
    """
    check_sinkhorn_options(tolerance, max_iters)
    with torch.no_grad():
        c = cost.detach()
        log_a, log_b = (torch.full((k,), -math.log(k), dtype=c.dtype, device=c.device)
                        for k in c.shape)
        if symmetric:
            f, _ = _self_potential(c, entropic_reg, tolerance, int(max_iters), log_a)
            g = f
        else:
            f, g, _ = _sinkhorn_potentials(c, entropic_reg, tolerance, int(max_iters), log_a, log_b)
        value = log_a.exp() @ f + log_b.exp() @ g
        if not cost.requires_grad:
            return value
        # Density clamped at e^-50 like `_softmin`: negligible, and it keeps torch.exp fast.
        density = ((f[:, None] + g[None, :] - c) / entropic_reg).clamp_min_(-50.0).exp_()
        plan = density * (log_a.exp()[:, None] * log_b.exp()[None, :])
    return _with_gradient(value, cost, plan)
