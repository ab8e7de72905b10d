"""rank/stage.py's `run` through the registry, on hand-built gaps (measuring them is tests/rank/test_stage.py's)."""
import pytest
from allocation_toys import measured_blocks, swin_like_shapes
from torch import nn

from orca_lora.config import Stage2Config
from orca_lora.rank import stage as rank_stage
from orca_lora.rank.allocations import ALLOCATIONS, Allocation
from orca_lora.rank.select import trainable_params
from orca_lora.run_files import RunFiles, read_gaps, read_ranks

SHAPES = swin_like_shapes([16, 16, 32, 32])


@pytest.fixture
def run_on_fixed_gaps(monkeypatch, tmp_path):
    monkeypatch.setattr(rank_stage, "measure_gaps", lambda stage, inputs: measured_blocks())
    monkeypatch.setattr(rank_stage, "adapted_module_shapes", lambda body, targets: dict(SHAPES))

    def run(**stage2):
        inputs = rank_stage.GapInputs(nn.Identity(), nn.Identity(), None, None, None, [], uniform_rank=4, seed=0,
                                      measure_seed=0)
        return rank_stage.run(Stage2Config(**stage2), inputs, RunFiles(tmp_path))
    return run


def test_a_stage_3_allocation_gets_uniform_ranks_and_its_budget(run_on_fixed_gaps, monkeypatch, tmp_path):
    def not_in_stage_2(inputs):
        raise AssertionError("stage 2 must not run a stage-3 allocation")

    monkeypatch.setitem(ALLOCATIONS, "gradient", Allocation("gradient", "stage3", not_in_stage_2))
    result = run_on_fixed_gaps(allocation="gradient", match_uniform_budget=True)
    uniform_cost = trainable_params(dict.fromkeys(SHAPES, 4), SHAPES)
    assert result.ranks == dict.fromkeys(SHAPES, 4) and result.budget == uniform_cost
    assert result.allocation == "gradient" and result.alpha0 is None and result.prior_masses is None
    assert read_ranks(RunFiles(tmp_path)) == result
    assert [row.rank for row in read_gaps(RunFiles(tmp_path))] == [4, 4, 4, 4]


def test_a_score_allocation_writes_its_ranks_and_block_means(run_on_fixed_gaps, tmp_path):
    result = run_on_fixed_gaps(allocation="depth-decreasing", budget=9000)
    assert result.allocation == "depth-decreasing" and result.budget == 9000
    assert result.trainable_params == trainable_params(result.ranks, SHAPES) <= 9000
    rows = read_gaps(RunFiles(tmp_path))
    assert [row.gap for row in rows] == pytest.approx([block.estimate.gap for block in measured_blocks()])
    assert [row.rank for row in rows] == sorted((row.rank for row in rows), reverse=True)
