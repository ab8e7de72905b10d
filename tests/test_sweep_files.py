"""sweep_files: the plan a sweep writes, read back with each planned point's state, and its failures."""
import math
from pathlib import Path

import pytest
from test_run_files import write_run

from orca_lora.records import StageRecord
from orca_lora.run_files import RunFiles, write_marker
from orca_lora.sweep_files import read_sweep_plans, unfinished, write_failure
from orca_lora.sweeps.grid import grid_points
from orca_lora.sweeps.sweep import Sweep, write_plan

REPO = Path(__file__).resolve().parents[1]


def test_the_plan_a_sweep_writes_is_read_with_each_points_state(tmp_path):
    points = grid_points([{"task": {"darcy": {"task.name": "darcy"}}, "stage3.rank": [1, 2, 4, 8]}])
    write_plan(Sweep("tiny", REPO / "configs" / "quickstart.yaml", (), points, tmp_path / "runs" / "tiny"))
    sweep_directory = tmp_path / "runs" / "tiny"
    plan, = read_sweep_plans([tmp_path / "runs"])
    assert [point.name for point in plan] == ["darcy_rank1", "darcy_rank2", "darcy_rank4", "darcy_rank8"]
    first, second, third, fourth = plan
    assert first.directory == sweep_directory / first.name and first.labels == {"task": "darcy", "rank": "rank1"}
    assert first.override("stage3.rank") == "1" and first.override("seed") is None
    write_marker(RunFiles(second.directory), "stage1", StageRecord("hash"))
    write_run(third.directory, math.nan)
    write_marker(RunFiles(fourth.directory), "stage1", StageRecord("hash"))
    write_failure(RunFiles(fourth.directory), "RuntimeError: out of memory")  # what the sweep records
    assert [unfinished(point) for point in plan] == \
        ["not started", "stopped in stage1: failed, interrupted or still running", "diverged",
         "failed: RuntimeError: out of memory"]
    write_run(first.directory, 0.2)
    assert unfinished(first) is None
    assert read_sweep_plans([tmp_path / "runs" / "tiny" / first.name]) == []  # a run directory is not a sweep
    (sweep_directory / "sweep.json").write_text("{}")
    with pytest.raises(ValueError, match="sweep.json: not a sweep plan .*run the sweep again"):
        read_sweep_plans([tmp_path])
