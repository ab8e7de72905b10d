from pathlib import Path

import matplotlib.image
import pytest

from orca_lora.experiments import plots
from orca_lora.run_files import (
    GapRow,
    RunFiles,
    read_alignment,
    read_gaps,
    read_training_log,
    write_alignment,
    write_gaps,
)

ALIGNMENT = ("otdd", [12.5, 7.25, 3.5])
GAPS = [GapRow(0, "layers.0.blocks.0", 16, 0.5, 0.6, 0.2, 0.1, 0.9, 0.0, 2),
        GapRow(1, "layers.0.blocks.1", 16, 1.5, 0.5, 0.001, 1.2, 1.8, 1.0, 6),
        GapRow(2, "layers.1.blocks.0", 32, 1.0, 0.4, 0.004, 0.7, 1.3, 0.6, 4)]
# Lightning's CSVLogger writes training and validation metrics on separate rows
METRICS = ("epoch,step,train_loss,val_error\n0,0,2.0,\n0,1,1.5,\n0,1,,0.6\n1,2,1.2,\n1,3,0.9,\n1,3,,0.4\n")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_figures(written: list[Path], stem: Path) -> None:
    assert written == [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    png, pdf = written
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > 100 and width > 100
    assert pdf.stat().st_size > 1000
    assert not [p for p in stem.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def captured(monkeypatch) -> list:
    """Each figure a plot function hands to save_figure, before it is written and closed."""
    figures = []
    save = plots.save_figure

    def spy(figure, stem):
        figures.append([(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                        for axis in figure.axes for line in axis.get_lines()]
                       + [("bars", [bar.get_x() + bar.get_width() / 2 for bar in axis.patches],
                           [bar.get_height() for bar in axis.patches]) for axis in figure.axes if axis.patches])
        return save(figure, stem)

    monkeypatch.setattr(plots, "save_figure", spy)
    return figures


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


def test_save_figure_leaves_no_temp_file_when_writing_fails(tmp_path, monkeypatch):
    figure, axis = plots.subplots()
    axis.plot([0, 1], [1, 0])

    def broken(path, format, **_):
        Path(path).write_text("half a figure")
        raise OSError("disk full")

    monkeypatch.setattr(figure, "savefig", broken)
    with pytest.raises(OSError):
        plots.save_figure(figure, tmp_path / "figure")
    assert not (tmp_path / "figure.png").exists()
    assert list(tmp_path.iterdir()) == [], "a failed save must not leave its temp file behind"


def sweep_records(tmp_path: Path) -> list:
    from orca_lora.experiments.tables import RunRecord

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


def test_posterior_ranks_are_block_medians_beside_the_gaps(tmp_path):
    posterior = {"body.layers.0.blocks.0.attn.qkv": 1, "body.layers.0.blocks.0.mlp.fc1": 3,
                 "body.layers.0.blocks.0.mlp.fc2": 4, "body.layers.1.blocks.0.attn.qkv": 0}
    assert plots.block_median_ranks(GAPS, posterior) == [3.0, None, 0.0]
    stem = tmp_path / "posterior_ranks"
    assert_figures(plots.plot_posterior_ranks(GAPS, posterior, dict.fromkeys(posterior, 8), stem), stem)


def test_gap_label_names_the_distance_units():
    assert "spectral rank" in plots.gap_label("spectral")
    assert plots.gap_label("mmd") == "modality gap D_i, mmd, source-anchored units"
