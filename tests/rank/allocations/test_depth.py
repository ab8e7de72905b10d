import pytest
from allocation_toys import assert_meets_budget, make_inputs

from orca_lora.rank.allocations import get_allocation
from orca_lora.rank.allocations.depth import depth_scores


def test_depth_scores_count_blocks_from_either_end():
    blocks = {"a": 0, "b": 1, "c": 3}
    assert depth_scores(blocks, 4, increasing=True) == {"a": 1.0, "b": 2.0, "c": 4.0}
    assert depth_scores(blocks, 4, increasing=False) == {"a": 4.0, "b": 3.0, "c": 1.0}


@pytest.mark.parametrize("name, later_gets_more", [("depth-increasing", True), ("depth-decreasing", False)])
def test_depth_ranks_follow_the_block_order_and_meet_the_budget(mixed_shapes, name, later_gets_more):
    budget = 9000
    result = get_allocation(name).allocate(make_inputs(mixed_shapes, allocation=name, budget=budget))
    assert_meets_budget(result.ranks, mixed_shapes, budget)
    assert result.budget == budget and result.alpha0 is None and result.prior_masses is None
    ordered = result.block_ranks if later_gets_more else result.block_ranks[::-1]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1]
    for module, shape in mixed_shapes.items():  # one score per block: its modules differ by the top-up only
        block = [rank for other, rank in result.ranks.items() if mixed_shapes[other].block == shape.block]
        assert max(block) - min(block) <= 1


def test_depth_ranks_at_the_matched_budget(mixed_shapes):
    inputs = make_inputs(mixed_shapes, allocation="depth-increasing", match_uniform_budget=True)
    result = get_allocation("depth-increasing").allocate(inputs)
    assert inputs.budget == 4 * sum(s.d_out + s.d_in for s in mixed_shapes.values())
    assert_meets_budget(result.ranks, mixed_shapes, inputs.budget)


def test_a_budgeted_allocation_built_without_a_budget_names_the_keys(mixed_shapes):
    with pytest.raises(ValueError, match=r"stage2.budget or stage2.match_uniform_budget"):
        get_allocation("depth-decreasing").allocate(make_inputs(mixed_shapes, allocation="depth-decreasing"))
