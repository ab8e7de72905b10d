"""The study figures, from `StudyResult`s built by hand: every file written, nothing for an absent part,
and the censoring and fit drawn where the plan puts them."""
import math

import numpy as np
import pytest

from orca_lora.reports import study_plots
from orca_lora.studies.block_evidence import BlockPoint, BlockTrend
from orca_lora.studies.hypothesis import ChosenRank, NoiseEstimate, RankRow, StudyResult, verdict
from orca_lora.studies.method_shares import MethodShare, RankBenefit, TrainingCheck
from orca_lora.studies.power import PowerResult
from orca_lora.studies.rank_threshold import VERDICTS, RankLawFit, TaskRank

RANKS = (1, 2, 4, 8, 16, 32)
# task: (gap, r* on validation, r* on test, log2 censoring interval, G, G interval)
TASKS = {"near": (20.0, 1, 1, (-math.inf, 0.0), 0.02, (-0.01, 0.05)),
         "mid": (80.0, 4, 8, (1.0, 2.0), 0.3, (0.1, 0.5)),
         "far": (300.0, 32, 32, (4.0, math.inf), 0.9, (0.6, 1.2)),
         "control": (900.0, 8, 8, (2.0, 3.0), 0.5, (0.2, 0.8))}
STEMS = {"study_rank_curves", "study_rank_vs_gap", "study_blocks", "study_method_shares", "study_rank_benefits"}


def curve_error(task: str, rank: int, shift: float = 0.0) -> float:
    return 0.1 + shift + 0.05 / rank + 0.01 * list(TASKS).index(task)


def rank_rows(tasks, n_seeds: int = 3) -> list[RankRow]:
    return [RankRow(task, rank, n_seeds, curve_error(task, rank), 0.001 if n_seeds > 1 else math.nan,
                    curve_error(task, rank, 0.005), 0.002 if n_seeds > 1 else math.nan)
            for task in tasks for rank in RANKS]


def chosen(tasks, n_seeds: int = 3) -> list[ChosenRank]:
    return [ChosenRank(task, TASKS[task][0], TASKS[task][1], curve_error(task, TASKS[task][1], 0.005),
                       0.002 if n_seeds > 1 else math.nan, TASKS[task][2]) for task in tasks]


def task_rank(task: str) -> TaskRank:
    gap, r_star, _, interval, benefit, benefit_interval = TASKS[task]
    means = np.array([curve_error(task, rank) for rank in RANKS])
    return TaskRank(task, gap, r_star, interval, (float(r_star), float(r_star)), {r_star: 1.0}, benefit,
                    benefit_interval, means, np.full(len(RANKS), 0.001))


def fit() -> RankLawFit:
    return RankLawFit(0.83, (0.21, 1.52), -3.1, 0.7, 0.012, 0.61, "proportional", 0.8, 0.042, 0.9, 1.6, 999, 0.95,
                      [task_rank(task) for task in TASKS])


def power(beta: float, growth: float) -> PowerResult:
    rates = {label: 0.0 for label in VERDICTS} | {"proportional": growth, "no evidence": 1 - growth}
    return PowerResult(100, beta, 0.94, rates, growth, 1.8, 199)


def block_points(task: str, values, gaps) -> list[BlockPoint]:
    return [BlockPoint(task, block, f"layers.{block // 2}.blocks.{block % 2}", gap, value,
                       math.nan if block == 5 else 0.1, 3) for block, (gap, value) in enumerate(zip(gaps, values))]


def secondary(result: StudyResult) -> StudyResult:
    """The plan's secondary parts on darcy-like 'mid' and 'far' (one block at gap 0)."""
    gaps = [0.0, 0.4, 0.9, 1.6, 2.5, 4.0]
    result.posterior = block_points("mid", [1, 2, 2, 3, 4, 5], gaps) + block_points("far", [2, 3, 3, 5, 6, 8], gaps)
    result.one_block = block_points("mid", [0.0, 0.001, 0.002, 0.004, 0.003, 0.006], gaps)
    result.energy = block_points("far", [3, 5, 8, 9, 12, 15], gaps)
    result.trends = [BlockTrend("ibp-lora posterior rank", None, 0.31, (0.12, 0.5), 0.003, 10),
                     BlockTrend("one block at rank 1: validation error change", "mid", 0.9, None, 0.037, 5)]
    result.shares = [MethodShare(task, method, rank, [0, 1], 0.12, 0.001, share, interval, 0.2, 0.1)
                     for task in ("mid", "far") for method, rank, share, interval in
                     (("lora", 8, 0.7, (0.55, 0.85)), ("dora", 8, 0.75, (0.6, 0.9)),
                      ("ibp-lora", 8, 0.6, (math.nan, math.nan)))]
    result.benefits = [RankBenefit(task, regime, [0, 1], 1, 32, 0.15, 0.12, benefit, (benefit - 0.1, benefit + 0.1))
                       for task in ("mid", "far") for regime, benefit in
                       (("frozen embedder, 6 epochs", 0.25), ("trained embedder, 6 epochs", 0.05))]
    result.training = [TrainingCheck("mid", 8, [0], 6, 30, 0.14, 0.11, 0.13, 0.1)]
    return result


def study_result() -> StudyResult:
    """Four tasks, one censored at each end, with every secondary part."""
    noise = [NoiseEstimate(task, 0.05, 2.0, 0.5, 0.1, 0.8) for task in TASKS]
    result = StudyResult("frozen embedder, 6 epochs", 131, 4, 0.1, fit(), rank_rows(TASKS), chosen(TASKS), noise,
                         [power(1.0, 0.87), power(0.0, 0.04)])
    result = secondary(result)
    result.verdict = verdict(result)
    return result


def bare_result() -> StudyResult:
    """Two tasks of one seed: no fit, no power, no secondary part."""
    tasks = ("near", "far")
    noise = [NoiseEstimate(task, 0.05, 2.0, 0.5, math.nan, 0.8) for task in tasks]
    result = StudyResult("frozen embedder, 6 epochs", 12, 2, 0.1, None, rank_rows(tasks, 1), chosen(tasks, 1), noise,
                         [])
    result.verdict = verdict(result)
    return result


@pytest.fixture
def captured(monkeypatch) -> list:
    """The figures the plot functions would save, without rendering them."""
    figures = []

    def keep(figure, stem):
        figures.append(figure)
        return [stem]

    monkeypatch.setattr(study_plots, "save_figure", keep)
    return figures


def test_plot_study_writes_every_figure_as_png_and_pdf(tmp_path):
    written = study_plots.plot_study(study_result(), tmp_path)
    assert {(path.stem, path.suffix) for path in written} == {(s, x) for s in STEMS for x in (".png", ".pdf")}
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:4] == (b"\x89PNG" if path.suffix == ".png" else b"%PDF")
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_absent_parts_draw_nothing(captured, tmp_path):
    bare = bare_result()
    assert {path.name for path in study_plots.plot_study(bare, tmp_path)} == {"study_rank_curves",
                                                                              "study_rank_vs_gap"}
    for plot in (study_plots.plot_block_panel, study_plots.plot_method_shares, study_plots.plot_rank_benefits):
        assert plot(bare, tmp_path / "absent") == []
    empty = StudyResult("frozen embedder, 6 epochs", 0, 0, 0.1, None, [], [], [], [])
    assert study_plots.plot_rank_curves(empty, tmp_path / "none") == []
    assert study_plots.plot_rank_vs_gap(empty, tmp_path / "none") == []
    assert len(captured) == 2
    law = captured[1].axes[0]
    assert "no fit" in law.get_title() and law.get_legend() is None


def test_rank_curves_have_one_titled_panel_per_task_with_r_star(captured, tmp_path):
    study_plots.plot_rank_curves(study_result(), tmp_path / "curves")
    panels = [axis for axis in captured[0].axes if axis.axison]
    assert [axis.get_title() for axis in panels] == ["near (gap D 20)", "mid (gap D 80)", "far (gap D 300)",
                                                     "control (gap D 900)"]
    far = panels[2]
    assert any(list(line.get_xdata()) == [32, 32] for line in far.get_lines())  # r* = 32, dashed
    assert any(list(line.get_ydata()) == [0.2, 0.2] for line in far.get_lines())  # linear's test error
    assert not any(list(line.get_ydata()) == [0.2, 0.2] for line in panels[0].get_lines())  # near: no linear run


def test_rank_vs_gap_clips_infinite_ends_one_grid_step_beyond(captured, tmp_path):
    study_plots.plot_rank_vs_gap(study_result(), tmp_path / "law")
    law, blocks = captured[0].axes
    segments = {line.get_xdata()[0]: list(line.get_ydata()) for line in law.get_lines()
                if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]}
    assert segments[300.0] == [16.0, 64.0]  # (4, +inf) drawn up to one doubling beyond 32
    assert segments[20.0] == [0.5, 1.0]  # (-inf, 0] drawn down to one halving below 1
    assert segments[80.0] == [2.0, 4.0]
    assert "proportional" in law.get_title()
    legend = [text.get_text() for text in law.get_legend().get_texts()]
    assert sum("centroid" in text for text in legend) == 2
    assert any(text.get_text().startswith("mixed model: slope 0.31") for text in blocks.get_legend().get_texts())


def test_method_labels_name_rank_except_ibp_lora():
    labels = [study_plots.method_label(share) for share in study_result().shares[:3]]
    assert labels == ["lora r=8", "dora r=8", "ibp-lora"]
