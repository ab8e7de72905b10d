"""Tests of a sweep's figures (orca_lora/reports/sweep_plots.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from reports.figure_checks import ALIGNMENT, assert_figures

from orca_lora.reports import sweep_plots as plots
from orca_lora.run_files import RunFiles, write_alignment


def sweep_records(tmp_path: Path) -> list:
    from orca_lora.studies.seed_table import RunRecord

    records = []
    for task, gap, errors in (("darcy", 1.0, [0.2, 0.15, 0.12]), ("procedural", 0.2, [0.3, 0.29, 0.29])):
        for rank, error in zip((1, 2, 4), errors):
            directory = tmp_path / f"{task}{rank}"
            write_alignment(RunFiles(directory), *ALIGNMENT)
            records.append(RunRecord(directory, task, "lora", "uniform", rank, 0, error, error, 0.5, 100 * rank,
                                     [gap, gap / 2], [rank, rank]))
    records.append(RunRecord(tmp_path / "ibp", "darcy", "lora", "gap-relative", 2, 0, 0.14, 0.14, 0.5, 190, [1.0, 0.5], [3, 1]))
    return records


def test_error_vs_rank_draws_each_task_beside_its_published_table(tmp_path, captured):
    stem = tmp_path / "error_vs_rank"
    assert_figures(plots.plot_error_vs_rank(sweep_records(tmp_path), stem), stem)
    [lines] = captured
    drawn = [(x, y) for _, x, y in lines]  # errorbar lines carry their label on the container, not the line
    assert ([1, 2, 4], [0.2, 0.15, 0.12]) in drawn and ([1, 2, 4], [0.3, 0.29, 0.29]) in drawn
    assert ([2], [0.14]) in drawn
    published = [line for line in lines if line[0].startswith("table 2: LoRA")]
    assert published[0][1] == [1, 2, 4, 8, 16, 64, 128, 256, 512, 1024] and published[0][2][0] == 0.0968


def test_gaps_by_block_and_alignment_draw_the_saved_numbers(tmp_path, captured):
    records = sweep_records(tmp_path)
    assert_figures(plots.plot_gaps_by_block(records, tmp_path / "gaps"), tmp_path / "gaps")
    assert ("darcy", [0, 1], [1.0, 0.5]) in captured[0] and ("darcy, matched to r=2", [0, 1], [3, 1]) in captured[0]
    assert_figures(plots.plot_alignment_curves(records, tmp_path / "align"), tmp_path / "align")
    assert ("procedural", [0, 1, 2], [12.5, 7.25, 3.5]) in captured[1]


@pytest.mark.slow
def test_plot_command_draws_a_sweep_or_a_run(tiny_sweep, capsys):
    from orca_lora.cli import main

    assert main(["plot", str(tiny_sweep)]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["error_vs_rank.png", "gaps_by_block.png", "alignment.png"]
    assert main(["plot", str(tiny_sweep / "darcy_rank1_uniform")]) == 0
    assert "training.png" in capsys.readouterr().out
