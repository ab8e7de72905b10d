import pytest

from orca_lora.config import ConfigError
from orca_lora.sweeps.grid import SweepPoint, format_value, grid_points, resolve_references


def test_format_value_writes_what_set_reads():
    assert [format_value(v) for v in (True, False, None, 0.5, 3, "darcy", [2, 2])] == \
        ["true", "false", "null", "0.5", "3", "darcy", "[2,2]"]


def test_grid_points_are_the_union_of_products_in_file_order():
    grids = [{"task": {"a": {"task.name": "darcy"}, "b": {"task.name": "procedural", "task.n_classes": 4}},
              "stage3.rank": [1, 4]},
             {"task": {"a": {"task.name": "darcy"}}, "stage3.rank": [4, 8]}]
    points = grid_points(grids)
    assert [p.name for p in points] == ["a_rank1", "a_rank4", "b_rank1", "b_rank4", "a_rank8"]
    assert points[2].overrides == ("task.name=procedural", "task.n_classes=4", "stage3.rank=1")
    assert points[2].labels == {"task": "b", "rank": "rank1"}


def test_axes_sharing_a_last_key_part_keep_their_full_keys():
    points = grid_points([{"stage3.rank": [2], "stage2.rank": [3]}])
    assert points[0].name == "stage3.rank2_stage2.rank3"


@pytest.mark.parametrize("grids, message", [
    ([{"stage3.rank": []}], "^axis 'stage3.rank' needs a non-empty list"),
    ([{"task": {"a": "darcy"}}], "must map config keys to values"),
    ([{}], r"^grids\[0\] must be a non-empty mapping of axes"),
    ([{"task": {"a": {"task.name": "darcy"}}}, {"task": {"a": {"task.name": "cifar10"}}}], "both named 'a'"),
])
def test_bad_grids_are_refused_naming_the_problem_first(grids, message):
    with pytest.raises(ConfigError, match=message):
        grid_points(grids)


def test_an_unknown_point_is_refused_with_names_that_exist(tmp_path):
    points = [SweepPoint("a_flat", {"role": "flat"}, ()),
              SweepPoint("a_reader", {"role": "reader"}, (), (("data_root", "a_flt"),))]
    with pytest.raises(ConfigError, match="names 'a_flt', no point of the sweep; points are named like a_flat"):
        resolve_references(points, tmp_path, "sweep.yaml")
    alone = [SweepPoint("a_reader", {"role": "reader"}, (), (("data_root", "a_flat"),))]
    with pytest.raises(ConfigError, match="the sweep has no other point"):
        resolve_references(alone, tmp_path, "sweep.yaml")
