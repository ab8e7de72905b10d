from pathlib import Path

import pytest

from orca_lora.reports import figures as plots


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
