"""Entropic optimal transport between two point clouds given their cost matrix: OTDD's outer problem.

OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b) with uniform weights, solved by log-domain Sinkhorn
with eps-scaling (Kosowsky & Yuille 1994; Schmitzer 2019, "Stabilized sparse scaling algorithms
for entropy regularized transport problems"; Feydy 2020, "Geometric data analysis, beyond
convolutions"): a geometric schedule eps_k = max(eps, R q^k) from the cost range R down to eps,
Sinkhorn iterations at every stage until that stage has converged, potentials carried from stage
to stage, the last stage run to the caller's marginal tolerance. Each stage starts near its
solution, so the iteration count grows with the number of stages, log(R / eps) / log(1 / q),
where plain Sinkhorn at a small eps needs a number growing like R / eps: its updates move a
potential by about eps per iteration.

What the scaling does not change is Sinkhorn's linear rate inside a stage: where the plan nearly
splits into weakly coupled groups of points, that rate is slow. bench_otdd_solver.py (20 to 2,000
points): at the default tolerance, 1 to 292 iterations for eps from 1 to 1e-3 x the median cost,
but up to 8,550 at 1e-6 x the median (600 points), near the cap; a tolerance far below the default
took POT 10^4 to 10^5 iterations from our potentials at 1e-3 x the median on some clouds of 20 to
30 points. The value's gradient in the cost is the plan (envelope theorem), attached without
differentiating the loop.
"""
import math
import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

# L1 error of the plan's marginal (a and b sum to 1, so it is relative to the mass). At ORCA's Darcy
# setting (bench_align's features, exact inner, eps 0.1) the loss against a float64 1e-9 solve was
# 2.1e-6 off at 1e-2 and 1.1e-7 at 1e-3 and 1e-4 (float32's floor).
SINKHORN_TOLERANCE = 1e-3
# Total Sinkhorn iterations (one g- and one f-update each) over all stages. bench_otdd_solver.py
# measured at most 292 for eps down to 1e-3 x the cost's median (20 to 2,000 points) and up to 8,550
# at 1e-6 x the median; the cap is there to stop a runaway, not to end a converging solve.
SINKHORN_MAX_ITERS = 10_000
# q of the schedule, halving eps from stage to stage as geomloss's default scaling does. Over q from 0.3
# to 0.85 the iterations at eps = 1e-3 x the median varied by up to 2.2x, no q the best on every cloud
# of bench_otdd_solver.py.
EPS_RATIO = 0.5
# Stages before the last stop once every row's mass is within e^(+-0.01) of its target. At eps = 1e-6
# x the median, bench_otdd_solver.py's four clouds took 412 to 8,550 iterations with it, 292 to 10,000
# (the cap) with 3e-2 and 609 to 4,168 with 3e-3: no rule the best on every cloud.
STAGE_LOG_RATIO = 1e-2


class SinkhornCapWarning(RuntimeWarning):
    """The outer Sinkhorn hit its iteration cap before its marginal error met the tolerance."""


class SinkhornResult(NamedTuple):
    """Dual potentials of OT_eps(a, b) (g = f for a self-transport), the reached marginal L1 error
    and the Sinkhorn iterations spent over all stages."""

    f: Tensor
    g: Tensor
    error: float
    iterations: int


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


def eps_schedule(cost_range: float, eps: float, ratio: float = EPS_RATIO) -> list[float]:
    """eps_k = max(eps, R ratio^k), k = 0, 1, ..., K: from the cost range R (at eps >= R the plan
    is near a x b, so the eps = inf start is close) to eps itself, the last stage."""
    start = max(cost_range, eps)
    # The 1e-9 keeps a float ratio such as R / eps = 2^k from adding a stage that repeats eps.
    stages = max(0, math.ceil(math.log(start / eps) / math.log(1.0 / ratio) - 1e-9))
    return [max(eps, start * ratio**k) for k in range(stages + 1)]


def _stage(update: Callable, f: Tensor, eps: float, tolerance: float, final: bool, budget: int,
           log_a: Tensor) -> tuple[Tensor, Tensor, float, int, bool]:
    """Sinkhorn iterations at one eps from f until converged or `budget` iterations are spent.

    `update(f, eps)` returns (g, t, f_next): the other potential, the soft c-transform t of g
    over the rows (the pair (f, g) has row marginal a_i exp((f_i - t_i) / eps)) and the next f.
    Converged: in the final stage the row L1 error is <= `tolerance`; before it every row's mass
    is within a factor e^(+-STAGE_LOG_RATIO) of a_i, a per-point bound (an L1 bound lets single
    rows of a large cloud stay far off, and the next, smaller eps then spends many updates
    there). Returns the checked pair f, g, its row L1 error, the iterations used, converged.
    """
    for used in range(1, budget + 1):
        g, t, f_next = update(f, eps)
        error = marginal_error(f, t, eps, log_a)
        if final:
            converged = error <= tolerance
        else:
            converged = float((f - t).abs().max()) <= STAGE_LOG_RATIO * eps
        if converged or used == budget:
            return f, g, error, used, converged
        f = f_next
    raise ValueError(f"a Sinkhorn stage needs a budget >= 1, got {budget}")


def _updates(cost: Tensor, log_a: Tensor, log_b: Tensor, symmetric: bool) -> Callable:
    """The iteration of `_stage`. Two potentials: g = T_a(f), then f' = T_b(g), so (f, g) has an
    exact column marginal. Self-transport (C = C^T, a = b): g = f, and the averaged update
    f' = (f + T(f)) / 2 of Feydy et al. (2019), whose plan errs alike on both sides."""
    def alternating(f: Tensor, eps: float):
        g = _softmin(eps, cost, log_a, f, dim=0)
        t = _softmin(eps, cost, log_b, g, dim=1)
        return g, t, t

    def averaged(f: Tensor, eps: float):
        t = _softmin(eps, cost, log_a, f, dim=1)
        return f, t, 0.5 * (f + t)

    return averaged if symmetric else alternating


def _warn_cap(eps: float, stage_eps: float, error: float, tolerance: float, max_iters: int) -> None:
    where = f", still at the schedule's eps={stage_eps:g} (marginal error {error:.2e} there)" \
        if stage_eps > eps else f" with marginal error {error:.2e} > tolerance {tolerance:.1e}"
    warnings.warn(
        f"entropic_ot: Sinkhorn reached its cap of {max_iters} iterations at eps={eps:g}{where}; "
        "raise sinkhorn_max_iters (stage1/stage2.sinkhorn_max_iters), loosen sinkhorn_tolerance, "
        "or raise entropic_reg",
        SinkhornCapWarning, stacklevel=4,
    )


def sinkhorn_potentials(cost: Tensor, eps: float, tolerance: float = SINKHORN_TOLERANCE,
                        max_iters: int = SINKHORN_MAX_ITERS, symmetric: bool = False) -> SinkhornResult:
    """Dual potentials of OT_eps(a, b), uniform a and b, by eps-scaling (see the module doc).

    Starts from the eps = inf solution, as geomloss does: f_i = <b, C_i.> - <a, C b> / 2; then
    one `_stage` per eps of `eps_schedule`, the last to `tolerance`. From the third stage on, a
    stage starts from the potentials of the two before, extrapolated linearly in eps to its own
    (a first-order predictor step along the smooth path eps -> f_eps, as in continuation methods).
    `max_iters` caps
    the iterations of all stages together; reaching it unconverged warns (`SinkhornCapWarning`).
    `symmetric`: C = C^T and a = b, one potential f = g. The pair returned is the one checked.
    """
    log_a, log_b = (torch.full((k,), -math.log(k), dtype=cost.dtype, device=cost.device)
                    for k in cost.shape)
    a, b = log_a.exp(), log_b.exp()
    f = cost @ b
    f = f - 0.5 * (a @ f)
    update = _updates(cost, log_a, log_b, symmetric)
    # Self-transport skips the scaling: from the eps = inf start the averaged update settled in
    # 3 to 9 iterations at every eps from 1 to 1e-6 x the median cost in bench_otdd_solver.py
    # (its plan is near the diagonal, where the update is exact in one step), and the schedule's
    # stages would cost more than that.
    schedule = [eps] if symmetric else eps_schedule(float(cost.max() - cost.min()), eps)
    used, error, g, converged_at = 0, math.inf, f, []
    for k, eps_k in enumerate(schedule):
        if used == max_iters:  # an earlier stage converged on the last iteration of the budget
            _warn_cap(eps, eps_k, error, tolerance, max_iters)
            break
        if len(converged_at) == 2:
            (f_before, eps_before), (f, eps_f) = converged_at
            f = f + (eps_k - eps_f) / (eps_f - eps_before) * (f - f_before)
        final = k == len(schedule) - 1
        f, g, error, spent, converged = _stage(update, f, eps_k, tolerance, final, max_iters - used,
                                               log_a)
        used += spent
        if not converged:  # only when the budget ran out
            _warn_cap(eps, eps_k, error, tolerance, max_iters)
            break
        converged_at = [*converged_at[-1:], (f, eps_k)]
    return SinkhornResult(f, g, error, used)


def working_dtype(cost: Tensor, eps: float, tolerance: float) -> torch.dtype:
    """The dtype to solve in: the cost's, or float64 where its precision cannot meet `tolerance`.

    The exponents (f_i + g_j - C_ij) / eps carry a rounding error of ~u max|C| / eps (u the unit
    roundoff), a relative error of the plan's entries and so a floor of the marginal error. In
    float32 (u = 6e-8) that floor passes 1e-3 at eps < 6e-5 max|C|: ORCA's Darcy setting (costs
    <= ~500, eps 0.1) stays in float32, eps = 1e-3 on costs near 30 moves to float64.
    """
    if cost.dtype == torch.float64:
        return cost.dtype
    unit_roundoff = torch.finfo(cost.dtype).eps / 2
    return torch.float64 if unit_roundoff * float(cost.abs().max()) / eps > tolerance else cost.dtype


def is_self_transport(cost: Tensor) -> bool:
    """C = C^T up to rounding, as the cross cost of a dataset with itself (otdd(x, y, x, y)) is.
    With a = b uniform that is a self-transport problem: its solution is symmetric (P^T is
    optimal whenever P is, and the optimum is unique), so the averaged update solves it. The
    alternating updates creep there: from a start with f != g, the part of f - g between weakly
    coupled groups of points decays at the rate of the little mass the plan moves between them
    (24 points at eps = 0.1: a marginal error of 9e-7 after 20,000 iterations, where the averaged
    update reaches 1e-12 in ~30)."""
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        return False
    slack = 64 * torch.finfo(cost.dtype).eps * float(cost.abs().max())
    return bool((cost - cost.T).abs().max() <= slack)


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
    SamplesLoss(blur=s) = OT_{2 s^2}(C) / 2 in these units. Solved by eps-scaled log-domain
    Sinkhorn (`sinkhorn_potentials`) until the plan's marginal L1 error is <= `tolerance`, at
    most `max_iters` iterations over all stages (a `SinkhornCapWarning` names the cap when hit),
    in float64 where the cost's dtype cannot resolve eps (`working_dtype`); the value is the
    dual <a, f> + <b, g>. `symmetric` marks a self-transport cost (C = C^T, a = b); a cost
    found symmetric (`is_self_transport`) is solved as one too.
    Small eps: OT_eps - OT_0 lies between 0 and eps log(min(n, m)) (the plan's entropy), so for
    eps well below the cost differences the value is the exact OT's for practical purposes;
    the tests check it against POT's network simplex (`ot.emd2`) at eps = 1e-3 x the median cost.
    No gradient through the loop: the gradient in `cost` is the plan
    a_i b_j exp((f_i + g_j - C_ij) / eps) (envelope theorem). Not geomloss.ot.solve: in geomloss
    0.3.1 its `.value` backpropagates twice the plan, and its softmin runs torch.exp's slow
    underflow path.
    """
    check_sinkhorn_options(tolerance, max_iters)
    with torch.no_grad():
        c = cost.detach()
        work = c.to(working_dtype(c, entropic_reg, tolerance))
        symmetric = symmetric or is_self_transport(work)
        f, g, _, _ = sinkhorn_potentials(work, entropic_reg, tolerance, int(max_iters), symmetric)
        value = (f.mean() + g.mean()).to(c.dtype)  # <a, f> + <b, g> with uniform a, b
        if not cost.requires_grad:
            return value
        # Density clamped at e^-50 like `_softmin`: negligible, and it keeps torch.exp fast.
        density = ((f[:, None] + g[None, :] - work) / entropic_reg).clamp_min_(-50.0).exp_()
        plan = (density / (c.shape[0] * c.shape[1])).to(c.dtype)
    return _with_gradient(value, cost, plan)
