from pathlib import Path

import pytest

from orca_lora.config_load import load_config
from orca_lora.run_files import RunFiles
from orca_lora.sweep_files import read_failure, write_failure
from orca_lora.sweeps.jobs import PointFailed, PointJob, PointTask

REPO = Path(__file__).resolve().parents[2]


def point_task(tmp_path: Path, name: str, reads: tuple[Path, ...] = ()) -> PointTask:
    config = load_config(REPO / "configs" / "quickstart.yaml", [f"output.root={tmp_path}", f"output.name={name}"])
    return PointTask(config, reads)


def test_checkpoint_requeues_the_same_call(tmp_path):
    pytest.importorskip("submitit")
    job, task = PointJob(), point_task(tmp_path, "point")
    delayed = job.checkpoint(task)
    assert delayed.function is job and delayed.args == (task,) and delayed.kwargs == {}


def test_a_job_whose_dependency_did_not_finish_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr("orca_lora.sweeps.jobs.start_worker", lambda threads: None)  # this process's threads stay
    write_failure(RunFiles(tmp_path / "flat"), "RuntimeError: diverged")
    with pytest.raises(PointFailed, match="^point reader: not run: it reads point flat, which failed"):
        PointJob()(point_task(tmp_path, "reader", (tmp_path / "flat",)))
    with pytest.raises(PointFailed, match="it reads point other, which has not finished"):
        PointJob()(point_task(tmp_path, "second", (tmp_path / "other",)))
    assert read_failure(RunFiles(tmp_path / "reader")).startswith("not run: it reads point flat")
    assert "attempt of" in (tmp_path / "reader" / "run.log").read_text()
