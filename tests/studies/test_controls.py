from types import SimpleNamespace

import numpy as np
import pytest

from orca_lora.reports.study_report import write_report
from orca_lora.studies import hypothesis as hyp
from orca_lora.studies.controls import ControlSummary, judge_control
from orca_lora.studies.study_runs import read_study
from study_toys import BLOCKS, write_study_run

RANKS = (1, 2, 3, 4, 6, 8)


def knee_curve(k: int, floor: float = 0.002, start: float = 0.03) -> np.ndarray:
    """A planted rank-k task's e(r): one missing direction of k costs (start - floor) / k, then the floor."""
    return np.array([floor + (start - floor) * max(k - r, 0) / k for r in RANKS])


def write_controls(root, plants, seeds=(0, 1), noise=1e-4, unadapted=None):
    """Runs of planted-shift at each (k, angle, block-0 gap, curve), LoRA over RANKS on every seed, and a rank-0
    (`linear`) run at error `unadapted` on every seed when given."""
    rng = np.random.default_rng(0)
    for k, angle, gap, curve in plants:
        block_gaps = np.r_[gap, np.full(len(BLOCKS) - 1, gap / 4)]
        for seed in seeds:
            methods = [("lora", rank, error) for rank, error in zip(RANKS, curve)]
            for method, rank, error in methods + ([("linear", 0, unadapted)] if unadapted else []):
                val = error + noise * rng.standard_normal(30)
                write_study_run(root, f"k{k}_a{angle}_r{rank}_s{seed}", task="planted-shift", method=method,
                                rank=max(rank, 1), seed=seed, val_errors=val, test_errors=val, block_gaps=block_gaps,
                                extra_overrides=[f"task.planted_k={k}", f"task.planted_angle={angle}"])


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    blurred = knee_curve(8)
    blurred[RANKS.index(6)] = blurred[-1]  # rank 6 already reaches the floor: r* = 6, not 8
    write_controls(root, [(1, 1.5, 10.0, knee_curve(1)), (2, 1.5, 20.0, knee_curve(2)), (4, 1.5, 40.0, knee_curve(4)),
                          (8, 1.5, 80.0, blurred)], unadapted=0.2)
    return root, hyp.evaluate_study(read_study([root]), n_resamples=99, power_studies=0)


def test_each_planted_task_is_checked_against_its_k(controls):
    _, result = controls
    summary = result.controls
    assert [(row.planted_k, row.r_star, row.recovered) for row in summary.rows] == [
        (1, 1, True), (2, 2, True), (4, 4, True), (8, 6, False)]
    assert summary.recovered == 3 and summary.gaps_increase_with_k
    # r* by log gain from the rank-0 runs (e(0) = 0.2): the tolerance is e_best (0.2 / e_best)^0.1 = 1.6 e_best;
    # the blurred k = 8 reaches its floor at rank 6 exactly: every rule beside it agrees, 6 is not worse than 8
    assert [row.gain_r_star for row in summary.rows] == [1, 2, 4, 6]
    assert [row.paired_r_star for row in summary.rows] == [1, 2, 4, 6]
    assert [row.ratio_r_star for row in summary.rows] == [1, 2, 4, 6]
    assert [row.unadapted_error for row in summary.rows] == pytest.approx([0.2] * 4, abs=1e-4)
    assert [row.task for row in summary.rows][0] == "planted-shift(planted_k=1)"
    # gaps planted exactly proportional to k: the known law r* = k is an elasticity of 1 against either gap
    assert summary.planted_elasticity == pytest.approx(1.0) and summary.block0_elasticity == pytest.approx(1.0)
    assert summary.rows[2].block0_gap == pytest.approx(40.0)
    assert summary.rows[2].mean_gap == pytest.approx((40.0 + 5 * 10.0) / 6)
    assert summary.rows[2].fraction_at_k > 0.5


def test_the_report_puts_planted_k_beside_the_recovered_rank(controls):
    root, result = controls
    text = write_report(result, root / "report").read_text()
    section = text.split("## Known-answer controls")[1].split("\n## ")[0]
    assert "| planted-shift(planted_k=8) | 8 | 6 | no | 6 | 6 | 6 | 0.2" in section
    assert "Recovered r* = k on 3 of 4 planted tasks. The mean gap increases with k." in section
    assert "requires of this control: r* = k on every task and the verdict \"proportional\". Met: **no**." in section
    assert [task.r_star for task in result.fit.tasks] == [1, 2, 4, 6]
    # the controls run one seed set per k: no power simulation, and the report names that reason (power off here)
    assert "No power simulation: not asked for (0 power studies)." in text


def test_judge_control_applies_the_plans_criterion_for_each_kind():
    def summary(recovered, increasing, at_floor):
        return ControlSummary([None] * 4, recovered, None, None, increasing, at_floor)

    def fit(verdict, interval):
        return SimpleNamespace(verdict=verdict, slope_interval=interval)

    assert judge_control(summary(4, True, False), fit("proportional", (0.9, 1.4)))[1] is True
    assert judge_control(summary(3, True, False), fit("proportional", (0.9, 1.4)))[1] is False  # one k missed
    assert judge_control(summary(4, True, False), fit("grows", (0.4, 0.9)))[1] is False
    assert judge_control(summary(4, True, False), None)[1] is False
    assert judge_control(summary(4, None, False), fit("no evidence", (-0.6, 0.0)))[1] is True  # a null
    assert judge_control(summary(4, None, False), fit("grows", (0.1, 0.8)))[1] is False
    assert judge_control(summary(4, None, False), None)[1] is None  # a null needs a fit to be judged
    assert judge_control(summary(4, False, True), None)[1] is True  # a function control
    assert judge_control(summary(2, False, True), None)[1] is False


def test_a_planted_task_without_rank_zero_runs_has_no_r_star_and_no_fit(tmp_path):
    write_controls(tmp_path, [(k, 1.5, 10.0 * k, knee_curve(k)) for k in (1, 2, 4)], seeds=(0,))
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=19, power_studies=0)
    assert [row.r_star for row in result.controls.rows] == [None] * 3 and result.controls.recovered == 0
    assert [row.gain_r_star for row in result.controls.rows][1:] == [2, 4]  # k = 1: a flat curve, noise picks
    assert len({row.task for row in result.rank_rows}) == 3 and result.chosen == []  # curves shown, no r*
    assert result.fit is None and sum("no rank-0 (`linear`) run" in line for line in result.deviations) == 3
    assert hyp.sweeps_phrase(result) == ("0 task(s) with a complete rank sweep and rank-0 runs (3 more without: run "
                                         "their `linear` points)")
    section = write_report(result, tmp_path / "report").read_text().split("## Known-answer controls")[1]
    assert "| planted-shift(planted_k=2) | 2 | n/a | no | 2 |" in section


def test_a_study_without_planted_tasks_has_no_controls_section(tmp_path):
    curve = knee_curve(2)
    for name, gap in (("darcy", 1.0), ("poisson", 2.0), ("procedural", 4.0)):
        for rank, error in zip(RANKS, curve):
            write_study_run(tmp_path, f"{name}_r{rank}", task=name, rank=rank, val_errors=np.full(5, error),
                            test_errors=np.full(5, error), block_gaps=np.full(len(BLOCKS), gap))
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=19, power_studies=0)
    assert result.controls is None
    assert "Known-answer controls" not in write_report(result, tmp_path / "report").read_text()


def test_a_planted_null_holds_one_k_while_the_gap_moves(tmp_path):
    write_controls(tmp_path, [(4, angle, gap, knee_curve(4)) for angle, gap in ((0.5, 5.0), (1.0, 20.0), (2.0, 45.0))],
                   seeds=(0,), unadapted=0.2)
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=19, power_studies=0)
    summary = result.controls
    assert [row.planted_k for row in summary.rows] == [4, 4, 4] and summary.recovered == 3
    assert summary.gaps_increase_with_k is None and summary.planted_elasticity == pytest.approx(0.0)
    section = write_report(result, tmp_path / "report").read_text().split("## Known-answer controls")[1]
    assert "Every task plants k = 4 (a planted null): only the gap moves." in section
    assert summary.passed is (result.fit.slope_interval[0] <= 0 <= result.fit.slope_interval[1]
                              and result.fit.verdict not in ("grows", "proportional"))
    assert "neither \"grows\" nor \"proportional\". Met:" in section


def test_a_function_control_keeps_every_gap_at_its_floor_and_gets_no_fit(tmp_path):
    rng = np.random.default_rng(1)
    for k in (2, 4, 8):
        for method, rank, error in [("lora", r, e) for r, e in zip(RANKS, knee_curve(k))] + [("linear", 0, 0.2)]:
            val = error + 1e-4 * rng.standard_normal(30)
            write_study_run(tmp_path, f"k{k}_r{rank}", task="planted-function", method=method, rank=max(rank, 1),
                            seed=0, val_errors=val, test_errors=val, block_gaps=np.zeros(len(BLOCKS)),
                            extra_overrides=[f"task.planted_k={k}"])
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=99, power_studies=0)
    summary = result.controls
    rows = [(row.planted_k, row.r_star, row.mean_gap) for row in summary.rows]
    assert rows == [(2, 2, 0.0), (4, 4, 0.0), (8, 8, 0.0)]
    assert summary.gaps_at_floor and not summary.gaps_increase_with_k and summary.planted_elasticity is None
    assert result.fit is None  # rank moved while the gap did not: nothing to attribute to the gap
    section = write_report(result, tmp_path / "report").read_text().split("## Known-answer controls")[1]
    assert "Every gap is at its floor (a function control: only rank moves)" in section
    assert summary.passed and "r* = k on every task and no fit (every gap at its floor). Met: **yes**." in section
    phrase = hyp.sweeps_phrase(result)
    assert phrase == "0 task(s) with a complete rank sweep and a positive gap (3 more at the gap floor)"
