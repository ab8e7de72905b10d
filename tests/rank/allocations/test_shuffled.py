import pytest
from allocation_toys import assert_meets_budget, make_inputs

from orca_lora.rank.allocations import get_allocation
from orca_lora.rank.allocations.shuffled import block_permutation

SEED = 3  # its permutation of 4 blocks is not the identity (checked below)


def block_masses(result, shapes) -> list[float]:
    masses = {shape.block: result.prior_masses[name] for name, shape in shapes.items()}
    return [masses[block] for block in sorted(masses)]


def both(shapes, **stage2):
    gap = get_allocation("gap").allocate(make_inputs(shapes, seed=SEED, allocation="gap", **stage2))
    shuffled = get_allocation("shuffled").allocate(make_inputs(shapes, seed=SEED, allocation="shuffled", **stage2))
    return gap, shuffled


def test_the_permutation_is_seeded_and_not_the_identity_here():
    order = block_permutation(4, SEED)
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert block_permutation(4, SEED) == order
    assert len({tuple(block_permutation(4, seed)) for seed in range(10)}) > 1


@pytest.mark.parametrize("reference", [None, 0.5])
def test_shuffled_block_masses_are_gaps_masses_permuted(mixed_shapes, reference):
    gap, shuffled = both(mixed_shapes, alpha0=2.0, gap_reference=reference, link="log1p")
    order = block_permutation(4, SEED)
    assert block_masses(shuffled, mixed_shapes) == pytest.approx([block_masses(gap, mixed_shapes)[i] for i in order])
    assert block_masses(shuffled, mixed_shapes) != pytest.approx(block_masses(gap, mixed_shapes))


def test_at_a_budget_the_mass_profile_is_a_permutation_and_the_budget_is_met(mixed_shapes):
    budget = 8000
    gap, shuffled = both(mixed_shapes, budget=budget)
    profile = sorted(mass / shuffled.alpha0 for mass in block_masses(shuffled, mixed_shapes))
    assert profile == pytest.approx(sorted(mass / gap.alpha0 for mass in block_masses(gap, mixed_shapes)))
    assert_meets_budget(shuffled.ranks, mixed_shapes, budget)
    assert shuffled.budget == budget


def test_on_equal_blocks_the_block_ranks_are_gaps_permuted(equal_shapes):
    order = block_permutation(4, SEED)
    gap, shuffled = both(equal_shapes, match_uniform_budget=True)
    for name, shape in equal_shapes.items():  # module m of block i takes module m of block order[i]
        twin = name.replace(f"layers.{shape.block // 2}.blocks.{shape.block % 2}",
                            f"layers.{order[shape.block] // 2}.blocks.{order[shape.block] % 2}")
        assert shuffled.ranks[name] == gap.ranks[twin]
    assert shuffled.block_ranks == [gap.block_ranks[i] for i in order]
    assert sorted(shuffled.ranks.values()) == sorted(gap.ranks.values())
    assert shuffled.ranks != gap.ranks
