import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import poisson

from orca_lora.rank.select import (
    LINKS,
    ModuleShape,
    RankPrior,
    absolute_ratios,
    fit_alpha_to_budget,
    gap_ratios,
    mass_profile,
    select_ranks,
    trainable_params,
    truncated_poisson,
)


def reference_rank(decision, rate, low, high, level=0.5):
    """The decision on Poisson(rate) truncated to [low, high], from scipy's untruncated pmf/cdf/ppf."""
    support = np.arange(low, high + 1)
    mass = poisson.cdf(high, rate) - poisson.cdf(low - 1, rate)
    pmf = poisson.pmf(support, rate) / mass
    if decision == "mean":
        return int(np.floor(support @ pmf + 0.5))
    if decision == "mode":
        return int(support[np.argmax(pmf)])
    # truncated quantile = untruncated quantile at the level mapped into [F(low - 1), F(high)]
    return int(np.clip(poisson.ppf(poisson.cdf(low - 1, rate) + level * mass, rate), low, high))


def swin_like_modules(depths=(2, 2, 6, 2), width=96):
    modules, block = {}, 0
    for stage, depth in enumerate(depths):
        c = width * 2**stage
        for _ in range(depth):
            for name, d_out, d_in in [("attn.qkv", 3 * c, c), ("attn.proj", c, c), ("mlp.fc1", 4 * c, c),
                                      ("mlp.fc2", c, 4 * c)]:
                modules[f"layers.{stage}.blocks.{block}.{name}"] = ModuleShape(block, d_out, d_in)
            block += 1
    return modules


SWIN_GAPS = [0.02, 0.05, 0.11, 0.08, 0.3, 0.25, 0.4, -0.01, 0.6, 0.5, 0.9, 1.4]


@pytest.mark.parametrize("rate, low, high", [(0.3, 1, 64), (3.7, 1, 8), (12.4, 2, 64), (40.2, 1, 16), (150.5, 1, 64)])
def test_truncated_poisson_matches_scipy(rate, low, high):
    support = np.arange(low, high + 1)
    expected = poisson.pmf(support, rate) / (poisson.cdf(high, rate) - poisson.cdf(low - 1, rate))
    np.testing.assert_allclose(truncated_poisson(rate, low, high), expected, rtol=1e-9, atol=1e-300)


def test_truncated_poisson_limits():
    np.testing.assert_array_equal(truncated_poisson(0.0, 2, 5), [1, 0, 0, 0])
    np.testing.assert_allclose(truncated_poisson(1e-12, 2, 5), [1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(truncated_poisson(2.0**60, 1, 64)[-1], 1.0)


@pytest.mark.parametrize("decision", ["mean", "mode", "quantile"])
@pytest.mark.parametrize("alpha0, r_max, quantile", [(0.4, 64, 0.5), (3.3, 64, 0.9), (7.6, 6, 0.2), (23.5, 64, 0.75)])
def test_decisions_match_scipy(decision, alpha0, r_max, quantile):
    modules = {"wide": ModuleShape(0, 256, 128), "narrow": ModuleShape(0, 4, 300)}
    prior = RankPrior(decision=decision, quantile=quantile, r_max=r_max, alpha0=alpha0)
    selection = select_ranks([0.7], modules, prior)
    assert selection.block_alpha == [pytest.approx(alpha0)]
    assert selection.block_ranks == [reference_rank(decision, alpha0, 1, r_max, quantile)]
    assert selection.ranks["wide"] == reference_rank(decision, alpha0, 1, r_max, quantile)
    assert selection.ranks["narrow"] == reference_rank(decision, alpha0, 1, min(r_max, 4), quantile)


def test_sample_decision_is_the_quantile_at_one_seeded_uniform_per_block():
    gaps = [0.1, 0.4, 0.2, 0.9, 0.5]
    modules = {f"b{i}.{m}": ModuleShape(i, 64 if m == "a" else 5, 64) for i in range(5) for m in "ab"}
    prior = RankPrior(decision="sample", alpha0=6.0, r_min=2, r_max=40, seed=11)
    selection = select_ranks(gaps, modules, prior)
    uniforms = np.random.default_rng(11).random(len(gaps))
    alphas = 6.0 * np.array(gaps) / np.mean(gaps)
    for i in range(5):
        assert selection.block_ranks[i] == reference_rank("quantile", alphas[i], 2, 40, uniforms[i])
        assert selection.ranks[f"b{i}.a"] == selection.block_ranks[i]
        assert selection.ranks[f"b{i}.b"] == reference_rank("quantile", alphas[i], 2, 5, uniforms[i])
    assert select_ranks(gaps, modules, prior) == selection
    other_seed = select_ranks(gaps, modules, RankPrior(decision="sample", alpha0=6.0, r_min=2, r_max=40, seed=12))
    assert other_seed.block_ranks != selection.block_ranks


@pytest.mark.parametrize("link, g", [("linear", lambda x: x), ("sqrt", np.sqrt), ("log1p", np.log1p)])
def test_links_scale_the_gap_ratio(link, g):
    gaps = [0.5, -0.2, 1.0, 2.5]
    clipped = np.array([0.5, 0.0, 1.0, 2.5])
    modules = {"m": ModuleShape(3, 32, 32)}
    selection = select_ranks(gaps, modules, RankPrior(link=link, alpha0=2.0))
    np.testing.assert_allclose(selection.block_alpha, 2.0 * g(clipped / clipped.mean()), rtol=1e-12)
    assert selection.block_ranks[1] == 1


def test_all_zero_gaps_give_every_block_ratio_one():
    np.testing.assert_array_equal(gap_ratios([0.0, -0.3, 0.0]), [1.0, 1.0, 1.0])
    selection = select_ranks([0.0, -0.1], {"m": ModuleShape(1, 8, 8)}, RankPrior(link="log1p", alpha0=5.0))
    assert selection.block_alpha == [pytest.approx(5.0 * np.log(2.0))] * 2


def test_zero_alpha0_puts_every_module_at_r_min():
    selection = select_ranks(SWIN_GAPS, swin_like_modules(), RankPrior(alpha0=0.0, r_min=3))
    assert set(selection.ranks.values()) == {3}


@st.composite
def gap_problems(draw):
    n_blocks = draw(st.integers(2, 7))
    gaps = draw(st.lists(st.floats(-0.5, 20.0, allow_nan=False), min_size=n_blocks, max_size=n_blocks))
    dims = st.integers(1, 48)
    modules = {f"b{b}.m{j}": ModuleShape(b, draw(dims), draw(dims)) for b in range(n_blocks) for j in range(2)}
    prior = RankPrior(
        link=draw(st.sampled_from(sorted(LINKS))),
        decision=draw(st.sampled_from(["mean", "mode", "quantile"])),
        quantile=draw(st.floats(0.05, 0.95)),
        r_min=1,
        r_max=draw(st.integers(1, 40)),
        alpha0=draw(st.floats(0.01, 60.0)),
    )
    return gaps, modules, prior, draw(st.integers(0, n_blocks - 1)), draw(st.floats(0.0, 5.0))


@settings(max_examples=150, deadline=None)
@given(gap_problems())
def test_ranks_monotone_in_gap_and_within_caps(problem):
    gaps, modules, prior, raised_block, increase = problem
    selection = select_ranks(gaps, modules, prior)
    clipped = np.clip(gaps, 0, None)
    caps = {name: min(prior.r_max, s.d_out, s.d_in) for name, s in modules.items()}
    for name, shape in modules.items():
        assert prior.r_min <= selection.ranks[name] <= caps[name]
    for i in range(len(gaps)):
        for j in range(len(gaps)):
            if clipped[i] <= clipped[j]:
                assert selection.block_ranks[i] <= selection.block_ranks[j]
    for a, sa in modules.items():
        for b, sb in modules.items():
            if caps[a] == caps[b] and clipped[sa.block] <= clipped[sb.block]:
                assert selection.ranks[a] <= selection.ranks[b]
    raised = list(gaps)
    raised[raised_block] = max(raised[raised_block], 0.0) + increase
    assert select_ranks(raised, modules, prior).block_ranks[raised_block] >= selection.block_ranks[raised_block]


@pytest.mark.parametrize("decision", ["mean", "mode", "quantile", "sample"])
@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.2, 0.47, 0.81, 1.0])
def test_budget_is_met_from_below_within_one_rank_one_component(decision, fraction):
    modules = swin_like_modules()
    floor = trainable_params({name: 1 for name in modules}, modules)
    ceiling = trainable_params({n: min(64, s.d_out, s.d_in) for n, s in modules.items()}, modules)
    budget = int(floor + fraction * (ceiling - floor))
    prior = RankPrior(decision=decision, budget=budget, seed=5)
    selection = select_ranks(SWIN_GAPS, modules, prior)
    largest_component = max(s.d_out + s.d_in for s in modules.values())
    assert selection.trainable_params == trainable_params(selection.ranks, modules)
    assert 0 <= budget - selection.trainable_params < largest_component
    assert selection.budget == budget


@pytest.mark.parametrize("decision", ["mean", "quantile", "sample"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6])
def test_fitted_alpha_is_the_last_step_at_or_below_the_budget(decision, fraction):
    modules = swin_like_modules()
    floor = trainable_params({name: 1 for name in modules}, modules)
    ceiling = trainable_params({n: min(64, s.d_out, s.d_in) for n, s in modules.items()}, modules)
    budget = int(floor + fraction * (ceiling - floor))
    prior = RankPrior(decision=decision, seed=5)
    alpha0 = fit_alpha_to_budget(SWIN_GAPS, modules, prior, budget)

    def cost(alpha):
        return select_ranks(SWIN_GAPS, modules, RankPrior(decision=decision, seed=5, alpha0=alpha)).trainable_params

    assert cost(alpha0) <= budget < cost(alpha0 * (1 + 1e-9))
    assert select_ranks(SWIN_GAPS, modules, RankPrior(decision=decision, seed=5, budget=budget)).alpha0 == alpha0


def test_budget_fills_blocks_without_gap_that_alpha_cannot_raise():
    modules = swin_like_modules(depths=(1, 1), width=8)
    ceiling = trainable_params({n: min(64, s.d_out, s.d_in) for n, s in modules.items()}, modules)
    selection = select_ranks([0.0, 1.0], modules, RankPrior(budget=ceiling - 5))
    assert 0 <= ceiling - 5 - selection.trainable_params < max(s.d_out + s.d_in for s in modules.values())
    assert max(r for n, r in selection.ranks.items() if modules[n].block == 0) > 1


def test_budget_outside_feasible_range_names_it():
    modules = {"m": ModuleShape(0, 10, 20)}
    with pytest.raises(ValueError, match=r"feasible range \[30, 300\]"):
        fit_alpha_to_budget([1.0], modules, RankPrior(r_max=64), 301)
    with pytest.raises(ValueError, match=r"feasible range \[30, 300\]"):
        select_ranks([1.0], modules, RankPrior(budget=29))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"link": "cubic"}, "RankPrior.link must be one of"),
        ({"decision": "median"}, "RankPrior.decision must be one of"),
        ({"quantile": 1.0}, "RankPrior.quantile"),
        ({"r_min": 0}, "RankPrior.r_min"),
        ({"r_min": 8, "r_max": 4}, "RankPrior.r_max"),
        ({"alpha0": -1.0}, "RankPrior.alpha0"),
        ({"alpha0": float("nan")}, "RankPrior.alpha0"),
        ({"budget": 0}, "RankPrior.budget"),
        ({"alpha0": 1.0, "budget": 100}, "exclusive"),
        ({"seed": -1}, "RankPrior.seed"),
    ],
)
def test_rank_prior_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankPrior(**kwargs)


def test_module_shape_validation():
    with pytest.raises(ValueError, match="ModuleShape.d_out"):
        ModuleShape(0, 0, 4)
    with pytest.raises(ValueError, match="ModuleShape.block"):
        ModuleShape(-1, 4, 4)


@pytest.mark.parametrize(
    "gaps, modules, prior, match",
    [
        ([0.1, 0.2], {"x": ModuleShape(5, 8, 8)}, RankPrior(alpha0=1.0), "block 5"),
        ([0.1], {"tiny": ModuleShape(0, 2, 8)}, RankPrior(alpha0=1.0, r_min=4), "'tiny'.*r_min"),
        ([0.1, float("nan")], {"x": ModuleShape(0, 8, 8)}, RankPrior(alpha0=1.0), r"finite; blocks \[1\]"),
        ([], {"x": ModuleShape(0, 8, 8)}, RankPrior(alpha0=1.0), "non-empty"),
        ([0.1], {}, RankPrior(alpha0=1.0), "modules is empty"),
        ([0.1], {"x": ModuleShape(0, 8, 8)}, RankPrior(), "alpha0.*budget"),
    ],
)
def test_select_ranks_bad_input(gaps, modules, prior, match):
    with pytest.raises(ValueError, match=match):
        select_ranks(gaps, modules, prior)


def test_absolute_link_grows_with_the_gap_scale_where_the_relative_one_cannot():
    """README, "P(r | D)": `gap` (D_i / D_ref) gives a 10x larger gap more rank; `gap-relative` (D_i / mean D) is
    blind to the scale; both on the same alpha_0."""
    modules = swin_like_modules()
    gaps = np.clip(SWIN_GAPS, 0, None)
    for reference in (0.1, [0.05 + 0.01 * i for i in range(12)]):
        absolute = RankPrior(alpha0=2.0, reference=reference)
        small, large = select_ranks(gaps, modules, absolute), select_ranks(10 * gaps, modules, absolute)
        assert all(large.ranks[m] >= small.ranks[m] for m in modules)
        assert large.trainable_params > small.trainable_params
    relative = RankPrior(alpha0=2.0)
    assert select_ranks(10 * gaps, modules, relative).ranks == select_ranks(gaps, modules, relative).ranks
    assert select_ranks(0.01 * gaps, modules, relative).ranks == select_ranks(gaps, modules, relative).ranks


def test_absolute_ratios_are_the_gap_over_its_reference():
    np.testing.assert_allclose(absolute_ratios([0.2, -0.1, 3.0], 0.5), [0.4, 0.0, 6.0])
    np.testing.assert_allclose(absolute_ratios([0.2, 0.6], [0.1, 0.3]), [2.0, 2.0])
    prior = RankPrior(link="sqrt", alpha0=1.0, reference=[0.25, 1.0])
    np.testing.assert_allclose(mass_profile([1.0, 4.0], prior), [2.0, 2.0])


def test_gaps_at_the_floor_get_r_min_and_flat_ignores_the_gaps():
    modules = swin_like_modules()
    at_floor = select_ranks(np.zeros(12), modules, RankPrior(alpha0=50.0, r_min=2, reference=0.3))
    assert set(at_floor.ranks.values()) == {2}
    flat = RankPrior(alpha0=6.0, flat=True)
    one, other = select_ranks(SWIN_GAPS, modules, flat), select_ranks(np.zeros(12), modules, flat)
    assert one.ranks == other.ranks and one.block_alpha == [6.0] * 12
    assert set(one.block_ranks) == {6}


@pytest.mark.parametrize("kwargs, match", [
    ({"reference": 0.0}, "RankPrior.reference must be a number > 0"),
    ({"reference": [1.0, -1.0]}, "RankPrior.reference"),
    ({"reference": 1.0, "flat": True}, "flat ignores the gaps"),
])
def test_rank_prior_reference_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankPrior(alpha0=1.0, **kwargs)


def test_reference_per_block_must_match_the_gaps():
    with pytest.raises(ValueError, match="3 entries for 2 gaps"):
        select_ranks([0.1, 0.2], {"m": ModuleShape(0, 8, 8)}, RankPrior(alpha0=1.0, reference=[1.0, 1.0, 1.0]))
