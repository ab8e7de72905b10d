"""The study report from `StudyResult`s built by hand (`test_study_plots`' fixtures): the verdict verbatim,
the tables' rows, the never-used test-chosen r*, and plain statements for every absent part."""
import dataclasses
import re
from pathlib import Path

import pytest
from reports.test_study_plots import bare_result, study_result
from studies.test_hypothesis import write_failed_point_sweep

from orca_lora.reports import study_plots
from orca_lora.reports import study_report as report
from orca_lora.studies.hypothesis import StudyResult, evaluate_study, verdict
from orca_lora.studies.study_runs import check_plan, read_study

SECTIONS = ["# Does the LoRA rank", "## Analysis plan", "## Tasks", "## Primary fit", "## Error against rank",
            "## Power at the measured noise", "## Per block", "## Methods against full fine-tuning",
            "## Rank benefit: embedder frozen", "## Minimum of training", "## Limits"]


def unrendered(figure, stem: Path) -> list[Path]:
    """save_figure writing placeholders (rendering is tested in test_study_plots)."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder")
    return paths


def written(result: StudyResult, directory: Path, **options) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study_plots, "save_figure", unrendered)
        path = report.write_report(result, directory, **options)
    assert path == directory / "report.md"
    return path.read_text()


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[StudyResult, str, Path]:
    result, directory = study_result(), tmp_path_factory.mktemp("full")
    return result, written(result, directory, command="orca-lora report runs/study", wall_time="1 h 20 min"), \
        directory


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> tuple[StudyResult, str]:
    result = bare_result()
    return result, written(result, tmp_path_factory.mktemp("bare"))


def test_opens_with_the_verdict_verbatim_and_the_design(full):
    result, text, _ = full
    paragraph = text.split("\n\n")[1]
    assert result.verdict and paragraph.startswith(result.verdict)
    assert "Primary regime: frozen embedder, 6 epochs; 4 task(s) with a complete rank sweep; 131 runs read." \
        in paragraph
    assert "`orca-lora report runs/study`" in text and "1 h 20 min" in text
    assert "`configs/study_gap.md`" in text and "](configs" not in text


def test_sections_come_in_the_plan_order(full):
    positions = [full[1].index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)


def test_task_table_renders_censoring_as_rank_ranges_and_the_unused_test_choice(full):
    text = full[1]
    assert "| task | gap D | r* (validation) | r* interval (ranks) | r* on test (never used) |" in text
    assert "| near | 20 | 1 | (0, 1] | 1 | 0.155 ± 0.002 | 0.02 [-0.01, 0.05] |" in text
    assert "| mid | 80 | 4 | (2, 4] | 8 | 0.1275 ± 0.002 | 0.3 [0.1, 0.5] |" in text
    assert "| far | 300 | 32 | (16, ∞) | 32 |" in text


def test_fit_rank_table_and_power(full):
    text = full[1]
    assert "| beta (r* ~ D^beta) | 0.83 |" in text and ("| 95% interval (bootstrap, 999 replicates; joined by the "
                                                       "slopes of exact lines where any meet every task) | "
                                                       "[0.21, 1.52] |") in text
    assert "| p for beta = 0 | 0.012 |" in text and "| leave-one-task-out error, without the gap | 1.60 |" in text
    assert "| mid | 4 | 3 | 0.1225 ± 0.001 | 0.1275 ± 0.002 | r* (validation) |" in text
    assert "| mid | 8 | 3 | 0.1163 ± 0.001 | 0.1213 ± 0.002 | r* on test (never used) |" in text
    assert "| 1.00 | 100 | 94% | 87% | proportional 87%, grows 0%, falls 0%, flat 0%, no evidence 13% | 1.80 | 199 |" \
        in text
    assert "| far | 0.05 | 2 | 0.5 | 0.1 | 0.8 |" in text


def test_secondary_tables(full):
    text = full[1]
    assert "| ibp-lora posterior rank | pooled (mixed model) | slope 0.31 of log2(1 + value) per doubling of D |" \
           " [0.12, 0.5] | 0.003 | 10 |" in text
    assert "| mid | dora r=8 | 8 | 0, 1 | 0.12 ± 0.001 | 0.75 [0.6, 0.9] | 0.2 | 0.1 |" in text
    assert "| far | ibp-lora | 8 | 0, 1 | 0.12 ± 0.001 | 0.60 [n/a, n/a] |" in text
    assert "| far | trained embedder, 6 epochs | 0, 1 | 1 -> 32 | 0.15 | 0.12 | 0.05 [-0.05, 0.15] |" in text
    assert "| mid | 8 | 0 | 6 / 30 | 0.14 / 0.11 | 0.13 / 0.1 | 1.273 | not met |" in text  # validation: 0.14 / 0.11
    assert "ratio <= 1.15" in text


def test_every_figure_is_embedded_by_relative_path(full):
    _, text, directory = full
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"plots/{stem}.png" for stem in ("study_rank_curves", "study_rank_vs_gap",
                                                                    "study_blocks", "study_method_shares",
                                                                    "study_rank_benefits"))
    assert all((directory / link).is_file() for link in links)
    assert not list(directory.glob(".report.md*"))


def test_limits_are_computed_from_the_data(full):
    limits = full[1][full[1].index("## Limits"):]
    assert "- 4 task(s) with a complete rank sweep (the plan asks for 8)." in limits
    assert "- Seeds per (task, rank): 3." in limits
    assert "G is not above 0 on validation (r* there reads noise, not need): near." in limits
    assert "(censored): near, far." in limits and "another r* on: mid." in limits
    assert "- Every part of the plan has data." in limits


def test_the_verdict_and_the_limits_name_the_same_flat_tasks():
    """One rule: a G interval below 0 (the larger rank no better) is as flat as one holding 0, in the
    verdict sentence and in the Limits alike (they once applied `low <= 0` and `low <= 0 <= high`)."""
    result = study_result()
    below = {"control": (-0.3, -0.1)}
    tasks = [dataclasses.replace(task, rank_benefit_interval=below.get(task.task, task.rank_benefit_interval))
             for task in result.fit.tasks]
    result = dataclasses.replace(result, fit=dataclasses.replace(result.fit, tasks=tasks))
    sentence = verdict(result)
    named_in_verdict = re.search(r"G is not above 0 on validation \(([^)]*)\)", sentence).group(1).split(", ")
    limits = "\n".join(report._limits_section(result))
    named_in_limits = re.search(r"not need\): (.*)\.", limits).group(1).split(", ")
    assert named_in_verdict == named_in_limits == ["near", "control"]


def test_absent_parts_are_said_plainly(bare):
    result, text = bare
    assert result.verdict.startswith("No verdict") and result.verdict in text
    for statement in ("No fit: 2 task(s) with a complete rank sweep", "No power simulation",
                      "No ibp-lora posterior ranks", "No one-block runs", "No energy ranks",
                      "No methods-vs-full comparison", "No frozen-vs-trained comparison",
                      "No minimum-of-training check", "- Seeds per (task, rank): 1.",
                      "| far | 300 | 32 | (16, ∞) | 32 | 0.1266 (one seed) | n/a (no fit) |",
                      "- Missing from this study: no fit; no power simulation; no ibp-lora posterior ranks; "
                      "no one-block runs;"):
        assert statement in text, statement
    assert "study_blocks" not in text and "plots/study_rank_curves.png" in text


def test_an_empty_result_still_reports(tmp_path):
    text = written(StudyResult("frozen embedder, 6 epochs", 0, 0, 0.1, None, [], [], [], []), tmp_path)
    assert "No verdict was computed." in text and "No task has a complete rank sweep" in text
    assert "No rank curves" in text and "No noise estimates" in text and "![" not in text



def test_a_failed_point_of_the_sweeps_plan_is_named_and_its_curve_not_called_complete(tmp_path):
    runs = read_study([write_failed_point_sweep(tmp_path)])
    result = evaluate_study(runs, n_resamples=19, power_studies=0, plan=check_plan([tmp_path], runs))
    text = written(result, tmp_path)
    assert "complete rank sweep" not in text
    assert "3 task(s) with a rank sweep, 1 of them incomplete (darcy); 11 runs read." in text
    section = text[text.index("## Planned points that did not finish"):text.index("## Analysis plan")]
    assert "1 of the sweep's 12 planned points have no finished run" in section
    assert "| darcy_rank4 | stopped in stage1: failed, interrupted or still running | darcy | lora | 4 | 0 | yes |" \
        in section
    assert "- darcy: incomplete curve, none at rank 4; r* chosen from ranks 1, 8." in section
    assert "darcy_rank4 (darcy, lora, rank 4, seed 0;" in text.split("\n\n")[1]  # the verdict names it
