"""P(r | D_i): a LoRA rank per block from the modality gap, under the IBP row marginal.

README, "P(r | D)".
Block i is an IBP customer with mass alpha_i = alpha_0 * g(D_i / D_ref),
g a link function and D_ref either the mean gap over the blocks (`gap-relative`: a within-task
allocation, blind to the gap's overall scale) or an absolute reference, a constant or each block's
noise floor (`gap`: ten times the gap gives more rank); `flat` gives every block alpha_0. In the IBP every customer's dish count is Poisson(alpha) (Griffiths & Ghahramani 2005),
so block i's rank is Poisson(alpha_i) truncated to [r_min, r_max_m], r_max_m = min(r_max, d_out, d_in)
for each adapted module m of the block, and a decision rule (mean, mode, quantile, sample) turns that
distribution into one rank. alpha_0 is given, or fitted by bisection so that the adapters' trainable
parameters sum_m r_m (d_out + d_in) meet a budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

from orca_lora.registry import registrar

Link = Callable[[np.ndarray], np.ndarray]
# (support r_min..r_max_m, pmf on it, RankPrior.quantile, the block's uniform draw u) -> rank
Decision = Callable[[np.ndarray, np.ndarray, float, float], int]

LINKS: dict[str, Link] = {}
DECISIONS: dict[str, Decision] = {}

# alpha_0 is searched over [2^-60, 2^60]: at 2^-60 every decision gives r_min (the truncated mass
# above r_min is ~2^-60, below double resolution), at 2^60 every block with a gap sits at its cap.
_LOG2_ALPHA_RANGE = (-60.0, 60.0)
_BISECTION_STEPS = 64


register_link = registrar(LINKS)
register_decision = registrar(DECISIONS)


@register_link("linear")
def _linear(x: np.ndarray) -> np.ndarray:
    return x


@register_link("sqrt")
def _sqrt(x: np.ndarray) -> np.ndarray:
    return np.sqrt(x)


@register_link("log1p")
def _log1p(x: np.ndarray) -> np.ndarray:
    return np.log1p(x)


@register_decision("mean")
def _mean(support: np.ndarray, pmf: np.ndarray, quantile: float, u: float) -> int:
    """E[r], rounded half up."""
    return int(np.floor(support @ pmf + 0.5))


@register_decision("mode")
def _mode(support: np.ndarray, pmf: np.ndarray, quantile: float, u: float) -> int:
    """argmax_r P(r); the lower rank on a tie."""
    return int(support[np.argmax(pmf)])


@register_decision("quantile")
def _quantile(support: np.ndarray, pmf: np.ndarray, quantile: float, u: float) -> int:
    """Smallest r with P(R <= r) >= quantile."""
    return _inverse_cdf(support, pmf, quantile)


@register_decision("sample")
def _sample(support: np.ndarray, pmf: np.ndarray, quantile: float, u: float) -> int:
    """A draw by inversion at the block's uniform u, so it is monotone in alpha_i for a fixed u."""
    return _inverse_cdf(support, pmf, u)


def _inverse_cdf(support: np.ndarray, pmf: np.ndarray, level: float) -> int:
    index = int(np.searchsorted(np.cumsum(pmf), level, side="left"))
    return int(support[min(index, support.size - 1)])


@dataclass
class ModuleShape:
    """An adapted Linear of block `block`: weight d_out x d_in; rank r costs r (d_out + d_in) parameters."""

    block: int
    d_out: int
    d_in: int

    def __post_init__(self) -> None:
        _check_int("ModuleShape.block", self.block, 0)
        _check_int("ModuleShape.d_out", self.d_out, 1)
        _check_int("ModuleShape.d_in", self.d_in, 1)


@dataclass
class RankPrior:
    """How gaps become ranks. Set alpha0 (the IBP mass at the mean gap, before the link) or budget
    (trainable adapter parameters that alpha0 is fitted to), not both. seed drives `sample`."""

    link: str = "linear"
    decision: str = "mean"
    quantile: float = 0.5
    r_min: int = 1
    r_max: int = 64
    alpha0: Optional[float] = None
    budget: Optional[int] = None
    seed: int = 0
    # None: D_i / mean D (relative); a number, or one per block: D_i / D_ref (absolute)
    reference: Optional[float | Sequence[float]] = None
    flat: bool = False  # every block the mass alpha_0, whatever its gap

    def __post_init__(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"RankPrior.link must be one of {sorted(LINKS)}, got {self.link!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"RankPrior.decision must be one of {sorted(DECISIONS)}, got {self.decision!r}")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"RankPrior.quantile must lie in (0, 1), got {self.quantile!r}")
        _check_int("RankPrior.r_min", self.r_min, 1)
        _check_int("RankPrior.r_max", self.r_max, self.r_min)
        if self.alpha0 is not None and not (np.isfinite(self.alpha0) and self.alpha0 >= 0):
            raise ValueError(f"RankPrior.alpha0 must be a finite number >= 0 or None, got {self.alpha0!r}")
        if self.budget is not None:
            _check_int("RankPrior.budget", self.budget, 1)
        if self.alpha0 is not None and self.budget is not None:
            raise ValueError("RankPrior.alpha0 and RankPrior.budget are exclusive: budget fits alpha0; set one")
        _check_int("RankPrior.seed", self.seed, 0)
        if self.reference is not None:
            reference = np.asarray(self.reference, dtype=float)
            if reference.ndim > 1 or not (np.isfinite(reference).all() and (reference > 0).all()):
                raise ValueError(f"RankPrior.reference must be a number > 0 or one per block, got {self.reference!r}; "
                                 "a block whose noise floor is 0 needs a constant stage2.gap_reference")
        if self.flat and self.reference is not None:
            raise ValueError("RankPrior.flat ignores the gaps, so it takes no reference; set one of them")


@dataclass
class RankSelection:
    """ranks: module name -> rank (final, budget top-up included). block_ranks[i]: the decision's rank
    for block i on [r_min, r_max], what its uncapped modules get before any budget top-up."""

    ranks: dict[str, int]
    block_ranks: list[int]
    block_alpha: list[float]
    alpha0: float
    trainable_params: int
    budget: Optional[int]


def truncated_poisson(rate: float, low: int, high: int) -> np.ndarray:
    """pmf of Poisson(rate) restricted to r = low..high:  p(r) = (rate^r / r!) / sum_{j=low}^{high} rate^j / j!.

    The e^-rate factor cancels, and leaving it out keeps large rates exact. rate = 0 gives the
    limit rate -> 0+, a point mass at `low`.
    """
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    if not (np.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
    support = np.arange(low, high + 1)
    if rate == 0.0:
        return (support == low).astype(float)
    logits = support * np.log(rate) - gammaln(support + 1)
    return np.exp(logits - logsumexp(logits))


def gap_ratios(gaps: Sequence[float]) -> np.ndarray:
    """x_i = max(D_i, 0) / mean_j max(D_j, 0); every x_i = 1 when all clipped gaps are 0.

    An unbiased MMD^2 estimate can dip below 0; a negative gap reads as no gap.
    """
    clipped = np.clip(_as_gaps(gaps), 0.0, None)
    mean = clipped.mean()
    return clipped / mean if mean > 0 else np.ones_like(clipped)


def absolute_ratios(gaps: Sequence[float], reference: float | Sequence[float]) -> np.ndarray:
    """x_i = max(D_i, 0) / D_ref_i, D_ref a constant or one reference per block (its noise floor):
    unlike `gap_ratios`, scaling every gap by c scales every x_i by c."""
    gap_array = _as_gaps(gaps)
    reference = np.broadcast_to(np.asarray(reference, dtype=float), gap_array.shape)
    return np.clip(gap_array, 0.0, None) / reference


def mass_profile(gaps: Sequence[float], prior: RankPrior) -> np.ndarray:
    """g(x_i), the block masses alpha_i = alpha_0 g(x_i) per unit alpha_0 (all ones when flat)."""
    gap_array = _as_gaps(gaps)
    if prior.flat:
        return np.ones_like(gap_array)
    if prior.reference is None:
        return LINKS[prior.link](gap_ratios(gap_array))
    reference = np.asarray(prior.reference, dtype=float)
    if reference.ndim == 1 and reference.size != gap_array.size:
        raise ValueError(f"RankPrior.reference has {reference.size} entries for {gap_array.size} gaps; give one per block")
    return LINKS[prior.link](absolute_ratios(gap_array, reference))


def trainable_params(ranks: Mapping[str, int], modules: Mapping[str, ModuleShape]) -> int:
    """sum_m r_m (d_out + d_in): LoRA's A (r x d_in) and B (d_out x r)."""
    return int(sum(ranks[name] * (shape.d_out + shape.d_in) for name, shape in modules.items()))


def select_ranks(gaps: Sequence[float], modules: Mapping[str, ModuleShape], prior: RankPrior) -> RankSelection:
    """Ranks for the adapted modules from the per-block gaps D_i (gaps[i] is block i's).

    With prior.budget set, alpha0 comes from `fit_alpha_to_budget` and the ranks are then topped up
    greedily, so that the trainable parameters fall short of the budget by less than the largest
    rank-1 cost max_m (d_out + d_in).
    """
    gap_array, caps = _prepare(gaps, modules, prior)
    if prior.alpha0 is None and prior.budget is None:
        raise ValueError("RankPrior needs alpha0 (the IBP mass) or budget (trainable parameters to fit alpha0 to)")
    alpha0 = prior.alpha0
    if alpha0 is None:
        alpha0 = fit_alpha_to_budget(gap_array, modules, prior, prior.budget)
    alphas = alpha0 * mass_profile(gap_array, prior)
    block_ranks, ranks = _decide(alphas, modules, caps, prior)
    if prior.budget is not None:
        ranks = _top_up(ranks, alphas, modules, caps, prior.budget)
    return RankSelection(
        ranks=ranks,
        block_ranks=block_ranks,
        block_alpha=[float(a) for a in alphas],
        alpha0=float(alpha0),
        trainable_params=trainable_params(ranks, modules),
        budget=prior.budget,
    )


def fit_alpha_to_budget(
    gaps: Sequence[float], modules: Mapping[str, ModuleShape], prior: RankPrior, budget: int
) -> float:
    """The largest alpha_0 (to bisection precision) whose ranks cost at most `budget` parameters.

    Cost is a non-decreasing step function of alpha_0 for every decision rule (the truncated Poisson
    grows stochastically with its rate; `sample` keeps its uniforms fixed), so bisection on log2 alpha_0
    finds the last step at or below the budget. prior.alpha0 and prior.budget are ignored.
    """
    gap_array, caps = _prepare(gaps, modules, prior)
    _check_int("budget", budget, 1)
    floor = trainable_params({name: prior.r_min for name in modules}, modules)
    ceiling = trainable_params(caps, modules)
    if not floor <= budget <= ceiling:
        raise ValueError(
            f"budget={budget} is outside the feasible range [{floor}, {ceiling}]: every module at "
            f"r_min={prior.r_min} .. every module at min(r_max={prior.r_max}, d_out, d_in)"
        )
    shape = mass_profile(gap_array, prior)

    def cost(log2_alpha: float) -> int:
        return trainable_params(_decide(2.0**log2_alpha * shape, modules, caps, prior)[1], modules)

    low, high = _LOG2_ALPHA_RANGE
    if cost(high) <= budget:
        return float(2.0**high)
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle
    return float(2.0**low)


def _decide(
    alphas: np.ndarray, modules: Mapping[str, ModuleShape], caps: Mapping[str, int], prior: RankPrior
) -> tuple[list[int], dict[str, int]]:
    """Block ranks on [r_min, r_max] and module ranks on [r_min, cap_m], one decision per (block, cap)."""
    decide = DECISIONS[prior.decision]
    uniforms = np.random.default_rng(prior.seed).random(alphas.size)
    decided: dict[tuple[int, int], int] = {}

    def rank(block: int, high: int) -> int:
        if (block, high) not in decided:
            pmf = truncated_poisson(float(alphas[block]), prior.r_min, high)
            support = np.arange(prior.r_min, high + 1)
            decided[block, high] = decide(support, pmf, prior.quantile, float(uniforms[block]))
        return decided[block, high]

    block_ranks = [rank(block, prior.r_max) for block in range(alphas.size)]
    return block_ranks, {name: rank(shape.block, caps[name]) for name, shape in modules.items()}


def _top_up(
    ranks: Mapping[str, int],
    alphas: np.ndarray,
    modules: Mapping[str, ModuleShape],
    caps: Mapping[str, int],
    budget: int,
) -> dict[str, int]:
    """Add ranks one at a time while they fit: passes over the modules by decreasing alpha_i (ties by
    block, then module order), one rank per module below its cap per pass. It ends when nothing fits,
    so every module is at its cap or costs more than what is left."""
    ranks = dict(ranks)
    left = budget - trainable_params(ranks, modules)
    order = sorted(modules, key=lambda name: (-alphas[modules[name].block], modules[name].block))
    added = True
    while added:
        added = False
        for name in order:
            cost = modules[name].d_out + modules[name].d_in
            if ranks[name] < caps[name] and cost <= left:
                ranks[name] += 1
                left -= cost
                added = True
    return ranks


def _prepare(
    gaps: Sequence[float], modules: Mapping[str, ModuleShape], prior: RankPrior
) -> tuple[np.ndarray, dict[str, int]]:
    """Validate the inputs; return the gaps and each module's cap min(r_max, d_out, d_in)."""
    gap_array = _as_gaps(gaps)
    if not modules:
        raise ValueError("modules is empty: pass {module name: ModuleShape(block, d_out, d_in)}")
    caps = {}
    for name, shape in modules.items():
        if not isinstance(shape, ModuleShape):
            raise ValueError(f"modules[{name!r}] must be a ModuleShape, got {type(shape).__name__}")
        if shape.block >= gap_array.size:
            raise ValueError(
                f"module {name!r} is in block {shape.block} but gaps has no entry for it "
                f"({gap_array.size} gaps, blocks 0..{gap_array.size - 1}); pass one gap per block"
            )
        caps[name] = min(prior.r_max, shape.d_out, shape.d_in)
        if caps[name] < prior.r_min:
            raise ValueError(
                f"module {name!r} ({shape.d_out} x {shape.d_in}) allows rank <= {caps[name]} but "
                f"RankPrior.r_min={prior.r_min}; lower r_min or drop the module"
            )
    return gap_array, caps


def _as_gaps(gaps: Sequence[float]) -> np.ndarray:
    gap_array = np.asarray(gaps, dtype=float)
    if gap_array.ndim != 1 or gap_array.size == 0:
        raise ValueError(
            f"gaps must be a non-empty 1-D sequence (one D_i per block), got shape {gap_array.shape}"
        )
    if not np.isfinite(gap_array).all():
        bad = np.flatnonzero(~np.isfinite(gap_array)).tolist()
        raise ValueError(f"gaps must be finite; blocks {bad} are not")
    return gap_array


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def block_uniform_ranks(shapes: Mapping[str, ModuleShape], rank: int, block_ranks: Mapping[int, int]) -> dict[str, int]:
    """`rank` in every module, `block_ranks[i]` in the modules of block i."""
    return {name: block_ranks.get(shape.block, rank) for name, shape in shapes.items()}
