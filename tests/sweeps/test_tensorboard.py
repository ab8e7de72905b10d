"""`trainer.logger: tensorboard`, read from the stopped sweep's runs (its points log with TensorBoard as well
as CSV): the event files hold what metrics.csv holds."""
import importlib.util
from pathlib import Path

import pytest

from orca_lora.config import ConfigError
from orca_lora.config_load import load_config
from orca_lora.run_files import RunFiles, read_training_log

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.xdist_group("sweep_launches")
def test_the_event_file_holds_the_val_error_series_of_metrics_csv(stopped_sweep):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = RunFiles(stopped_sweep.directory / "darcy_long")  # queued, never interrupted: one attempt
    events = event_accumulator.EventAccumulator(str(run.training_log.parent))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("val_error")]
    expected = [(int(row["step"]), float(row["val_error"])) for row in read_training_log(run) if row["val_error"]]
    assert len(logged) == len(expected) == 4  # one validation an epoch
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_the_tensorboard_logger_without_its_package_is_refused_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    extra = r"pip install orca-lora\[tensorboard\]"
    with pytest.raises(ConfigError, match=rf"^trainer.logger: 'tensorboard' needs the tensorboard package.*{extra}"):
        load_config(REPO / "configs" / "quickstart.yaml", ["trainer.logger=tensorboard"])
    with pytest.raises(ConfigError, match="trainer.logger: 'wandb' is not one of csv, tensorboard"):
        load_config(REPO / "configs" / "quickstart.yaml", ["trainer.logger=wandb"])
