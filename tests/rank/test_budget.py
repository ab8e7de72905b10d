import itertools

import numpy as np
import pytest

from orca_lora.rank.budget import proportional_ranks
from orca_lora.rank.select import ModuleShape, trainable_params


def modules():
    return {f"b{block}.{kind}": ModuleShape(block, out, inp) for block in range(3)
            for kind, out, inp in (("qkv", 3 * 16 * 2 ** block, 16 * 2 ** block), ("fc2", 16 * 2 ** block, 64 * 2 ** block))}


@pytest.mark.parametrize("seed", range(5))
def test_budget_met_within_one_rank1_component(seed):
    shapes = modules()
    scores = dict(zip(shapes, np.random.default_rng(seed).random(len(shapes)) * 10))
    budget = trainable_params(dict.fromkeys(shapes, 4), shapes)
    ranks = proportional_ranks(scores, shapes, budget, r_min=1, r_max=32)
    cost = trainable_params(ranks, shapes)
    assert budget - max(s.d_out + s.d_in for s in shapes.values()) < cost <= budget
    assert all(1 <= r <= min(32, shapes[n].d_out, shapes[n].d_in) for n, r in ranks.items())


def test_equal_scores_on_equal_modules_give_equal_ranks_and_order_follows_scores():
    shapes = {f"m{i}": ModuleShape(i, 32, 32) for i in range(4)}
    assert set(proportional_ranks(dict.fromkeys(shapes, 1.0), shapes, 4 * 64 * 5).values()) == {5}
    ranks = proportional_ranks({"m0": 1.0, "m1": 2.0, "m2": 3.0, "m3": 4.0}, shapes, 4 * 64 * 5, r_max=32)
    assert [ranks[f"m{i}"] for i in range(4)] == sorted(ranks.values())


def test_matches_brute_force_largest_feasible_proportional_rounding():
    """On a tiny case, the cost is the largest any rank vector in the box reaches under the budget
    when ranks are monotone in score (brute force over all such vectors)."""
    shapes = {"a": ModuleShape(0, 8, 4), "b": ModuleShape(1, 4, 4), "c": ModuleShape(2, 6, 2)}
    scores = {"a": 3.0, "b": 1.0, "c": 2.0}
    for budget in range(28, 96, 5):
        ranks = proportional_ranks(scores, shapes, budget, r_min=1, r_max=4)
        best = max(trainable_params(dict(zip(shapes, combo)), shapes)
                   for combo in itertools.product(*(range(1, min(4, s.d_out, s.d_in) + 1) for s in shapes.values()))
                   if trainable_params(dict(zip(shapes, combo)), shapes) <= budget)
        assert budget - 12 < trainable_params(ranks, shapes) <= best


def test_refuses_bad_scores_and_infeasible_budgets():
    shapes = modules()
    with pytest.raises(ValueError, match="missing"):
        proportional_ranks({}, shapes, 1000)
    with pytest.raises(ValueError, match=">= 0"):
        proportional_ranks({**dict.fromkeys(shapes, 1.0), "b0.qkv": -1.0}, shapes, 10_000)
    with pytest.raises(ValueError, match="feasible range"):
        proportional_ranks(dict.fromkeys(shapes, 1.0), shapes, 10)
