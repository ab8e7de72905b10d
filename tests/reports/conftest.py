"""The figure tests' `captured` fixture: what each plot function hands to save_figure."""
import pytest

from orca_lora.reports import figures as figures_module
from orca_lora.reports import run_plots, sweep_plots


@pytest.fixture
def captured(monkeypatch) -> list:
    """Each figure a plot function hands to save_figure, before it is written and closed."""
    figures = []
    save = figures_module.save_figure

    def spy(figure, stem):
        figures.append([(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                        for axis in figure.axes for line in axis.get_lines()]
                       + [("bars", [bar.get_x() + bar.get_width() / 2 for bar in axis.patches],
                           [bar.get_height() for bar in axis.patches]) for axis in figure.axes if axis.patches])
        return save(figure, stem)

    for module in (run_plots, sweep_plots):  # each imports save_figure by name
        monkeypatch.setattr(module, "save_figure", spy)
    return figures
