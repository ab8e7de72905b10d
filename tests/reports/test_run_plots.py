"""Tests of one run's figures (orca_lora/reports/run_plots.py)."""
from __future__ import annotations

import dataclasses

from reports.figure_checks import ALIGNMENT, assert_figures, write

from orca_lora.records import GapRow
from orca_lora.reports import run_plots as plots
from orca_lora.run_files import RunFiles, read_alignment, read_gaps, read_training_log, write_alignment, write_gaps

GAPS = [GapRow(0, "layers.0.blocks.0", 16, 0.5, 0.6, 0.2, 0.1, 0.9, 0.0, 2),
        GapRow(1, "layers.0.blocks.1", 16, 1.5, 0.5, 0.001, 1.2, 1.8, 1.0, 6),
        GapRow(2, "layers.1.blocks.0", 32, 1.0, 0.4, 0.004, 0.7, 1.3, 0.6, 4)]


# Lightning's CSVLogger writes training and validation metrics on separate rows
METRICS = ("epoch,step,train_loss,val_error\n0,0,2.0,\n0,1,1.5,\n0,1,,0.6\n1,2,1.2,\n1,3,0.9,\n1,3,,0.4\n")


def test_plot_alignment_draws_the_curve(tmp_path, captured):
    stem = tmp_path / "out" / "alignment"
    run = RunFiles(tmp_path)
    write_alignment(run, *ALIGNMENT)
    assert_figures(plots.plot_alignment(*read_alignment(run), stem), stem)
    assert captured == [[("otdd", [0, 1, 2], [12.5, 7.25, 3.5])]]


def test_plot_gaps_and_ranks_draws_bars_and_ranks(tmp_path, captured):
    stem = tmp_path / "gaps_and_ranks"
    run = RunFiles(tmp_path)
    write_gaps(run, GAPS)
    assert_figures(plots.plot_gaps_and_ranks(read_gaps(run), stem), stem)
    [lines] = captured
    assert ("LoRA rank r_i", [0, 1, 2], [2, 6, 4]) in lines
    assert ("bars", [0, 1, 2], [0.5, 1.5, 1.0]) in lines


def test_a_constant_rank_gets_an_integer_axis_from_zero_and_the_legend_covers_no_data(tmp_path, monkeypatch):
    """Every block at rank 2 once drew an axis from 1.900 to 2.100, under a legend on the bars."""
    kept = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, stem: kept.append(figure) or [])
    plots.plot_gaps_and_ranks([dataclasses.replace(row, rank=2) for row in GAPS], tmp_path / "constant")
    [figure] = kept
    gap_axis, rank_axis = figure.axes
    assert rank_axis.get_ylim()[0] == 0 and rank_axis.get_ylim()[1] >= 3
    figure.canvas.draw()
    ticks = [tick for tick in rank_axis.get_yticks() if rank_axis.get_ylim()[0] <= tick <= rank_axis.get_ylim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    legend = gap_axis.get_legend().get_window_extent()
    assert not legend.overlaps(gap_axis.get_window_extent()), "the legend sits on the plotted data"


def test_plot_training_draws_loss_and_validation_error_by_step(tmp_path, captured):
    stem = tmp_path / "training"
    run = RunFiles(tmp_path)
    write(run.training_log, METRICS)
    assert_figures(plots.plot_training(read_training_log(run), stem), stem)
    [lines] = captured
    assert lines == [("training loss", [0, 1, 2, 3], [2.0, 1.5, 1.2, 0.9]),
                     ("validation error", [1, 3], [0.6, 0.4])]


def test_plot_run_plots_only_what_the_run_directory_has(tmp_path):
    run = RunFiles(tmp_path / "run")
    write_alignment(run, *ALIGNMENT)
    assert plots.plot_run(run.root) == [run.plots / "alignment.png", run.plots / "alignment.pdf"]
    assert sorted(p.name for p in run.plots.iterdir()) == ["alignment.pdf", "alignment.png"]

    write_gaps(run, GAPS)
    write(run.training_log, METRICS)
    written = plots.plot_run(run.root)
    names = ["alignment", "gaps_and_ranks", "training"]
    assert written == [run.plots / f"{n}.{s}" for n in names for s in ("png", "pdf")]
    assert sorted(p.name for p in run.plots.iterdir()) == sorted(p.name for p in written)
    assert plots.plot_run(tmp_path / "empty") == [] and not (tmp_path / "empty").exists()


def test_posterior_ranks_are_block_medians_beside_the_gaps(tmp_path):
    posterior = {"body.layers.0.blocks.0.attn.qkv": 1, "body.layers.0.blocks.0.mlp.fc1": 3,
                 "body.layers.0.blocks.0.mlp.fc2": 4, "body.layers.1.blocks.0.attn.qkv": 0}
    assert plots.block_median_ranks(GAPS, posterior) == [3.0, None, 0.0]
    stem = tmp_path / "posterior_ranks"
    assert_figures(plots.plot_posterior_ranks(GAPS, posterior, dict.fromkeys(posterior, 8), stem), stem)


def test_gap_label_names_the_distance_units():
    assert "spectral rank" in plots.gap_label("spectral")
    assert plots.gap_label("mmd") == "modality gap D_i, mmd, source-anchored units"
