import math
from pathlib import Path

import pytest

from orca_lora.config_load import load_config
from orca_lora.run_files import RunFiles, read_gaps
from orca_lora.studies.plant_calibration import (PlantReading, calibrate_plants, format_calibration,
                                                 measure_with_stage2)

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
ANCHOR_GAPS = {0: 30.0, 1: 12.0, 2: 20.0, 3: 5.0}  # k = 1's gap under each plane seed


def toy_measure(calls: list | None = None, per_direction_at_pi: float = 25.0):
    """A gap that grows with the angle as a displacement does, 2 sin(theta / 2), linearly in k."""
    def measure(k: int, angle: float, planes: int) -> PlantReading:
        if calls is not None:
            calls.append((k, angle, planes))
        if k == 1:
            return PlantReading(ANCHOR_GAPS[planes], 2 * ANCHOR_GAPS[planes])
        gap = k * per_direction_at_pi * math.sin(angle / 2)
        return PlantReading(gap, 2 * gap)
    return measure


def test_calibrated_plants_have_a_gap_proportional_to_k():
    calibration = calibrate_plants(toy_measure(), [8, 1, 2, 4, 2], plane_seeds=range(4), default_planes=0)
    # seed 0's 30 per direction is out of reach (0.9 x 25 = 22.5): the largest reachable anchor is seed 2's 20
    assert calibration.gap_per_direction == 20.0
    assert [s.planted_k for s in calibration.settings] == [1, 2, 4, 8]
    assert calibration.settings[0].planes == 2 and calibration.settings[0].angle == math.pi
    for setting in calibration.settings[1:]:
        assert setting.reading.mean_gap == pytest.approx(20.0 * setting.planted_k, rel=0.02)
        assert setting.angle == pytest.approx(2 * math.asin(20.0 / 25.0), rel=0.02)  # the exact inverse
        assert setting.planes == 0
    assert calibration.reach == {2: 50.0, 4: 100.0, 8: 200.0}
    assert calibration.grid_entries()["k1"] == {"task.planted_k": 1, "task.planted_angle": math.pi,
                                                "task.planted_planes": 2}
    text = format_calibration(calibration)
    assert "gap per planted direction c = 20" in text and "k4: {task.planted_k: 4" in text


def test_calibration_measures_before_and_without_errors():
    calls = []
    calibrate_plants(toy_measure(calls), [1, 2], plane_seeds=range(4), default_planes=0)
    assert calls[:4] == [(1, math.pi, seed) for seed in range(4)] and calls[4] == (2, math.pi, 0)


def test_no_reachable_anchor_is_named_with_its_numbers():
    with pytest.raises(ValueError, match=r"no plane seed gives k = 1 .* at most 2.25 per direction"):
        calibrate_plants(toy_measure(per_direction_at_pi=2.5), [1, 2, 4], plane_seeds=range(4), default_planes=0)


def test_a_gap_that_does_not_follow_the_angle_is_refused():
    def flat(k: int, angle: float, planes: int) -> PlantReading:
        return PlantReading(1.0 if k == 1 else 3.0 * (1 + 0.0 * angle), 1.0)

    with pytest.raises(ValueError, match="k = 2: no angle"):
        calibrate_plants(flat, [1, 2], plane_seeds=[0], default_planes=0, max_steps=5)


def test_calibrations_need_two_k():
    with pytest.raises(ValueError, match=">= 2 planted k"):
        calibrate_plants(toy_measure(), [4, 4], plane_seeds=[0], default_planes=0)


def test_stage2_reads_the_plant_as_the_run_records_it(tiny_overrides, tmp_path):
    overrides = tiny_overrides + [
        "task.name=planted-shift", "task.resolution=32", "stage1.epochs=0", "stage1.embedder_init=source",
        "stage2.allocation=uniform", r"stage3.targets=[^embedder\.proj$]", "stage3.train_embedder=false"]
    measure = measure_with_stage2(load_config(QUICKSTART, overrides), tmp_path / "calibration")
    small, large = measure(2, 0.2, 0), measure(2, math.pi, 0)
    assert large.mean_gap > small.mean_gap and large.block0_gap > 0
    rows = read_gaps(RunFiles(tmp_path / "calibration" / f"k2_angle{math.pi:.6f}_planes0"))
    assert large == PlantReading(sum(row.corrected for row in rows) / len(rows), rows[0].corrected)


def test_only_planted_shift_is_calibrated(tiny_overrides):
    with pytest.raises(ValueError, match="task.name: calibrating plants needs planted-shift"):
        measure_with_stage2(load_config(QUICKSTART, tiny_overrides))
