import pytest

from orca_lora import choices
from orca_lora.rank.allocations import ALLOCATIONS, get_allocation
from orca_lora.rank.allocations.context import block_mean_ranks
from orca_lora.rank.select import ModuleShape


def test_the_registry_holds_the_stage_2_allocations_choices_lists():
    get_allocation("uniform")
    stage2 = {name for name, allocation in ALLOCATIONS.items() if allocation.phase == "stage2"}
    assert stage2 == set(choices.RANK_ALLOCATIONS) - set(choices.TRAINING_ALLOCATIONS)
    assert set(choices.TRAINING_ALLOCATIONS) < set(choices.RANK_ALLOCATIONS)


def test_an_unknown_allocation_is_named_with_the_known_ones():
    with pytest.raises(KeyError, match=r"'even' is not one of .*depth-decreasing"):
        get_allocation("even")


def test_block_mean_ranks_round_half_up_and_give_0_to_a_block_without_modules():
    shapes = {"a": ModuleShape(0, 8, 8), "b": ModuleShape(0, 8, 8), "c": ModuleShape(2, 8, 8)}
    assert block_mean_ranks({"a": 2, "b": 3, "c": 5}, shapes, 3) == [3, 0, 5]
