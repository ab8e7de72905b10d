"""Faults injected into real processes and real files: kills at a fixed step and resumes, SIGTERM,
a truncated checkpoint, two launches on one run directory, damaged caches and markers, NaN values
and diverged training. Every failure must leave a run that the same command finishes, with the
numbers of an uninterrupted run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orca_lora import cli
from orca_lora.config_load import load_config
from orca_lora.errors import INTERRUPTED_EXIT_CODE
from orca_lora.files import digest_path
from orca_lora.pipeline import run_pipeline
from orca_lora.run_files import RunFiles, read_marker, read_metrics, read_sample_errors, training_log_before
from orca_lora.run_lock import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
pytestmark = pytest.mark.slow

# stage 3 only (stage 1 off, stage 2 off): 86 training samples in batches of 16 are 6 steps an epoch.
# Dropout and DyLoRA draw from torch's global generator and the module's rank generator, the
# shuffle from the data module's: a resume must continue all three.
RESUMABLE = ["stage1.epochs=0", "stage2.enabled=false", "stage3.method=dylora", "stage3.dropout=0.1",
             "trainer.max_epochs=2", "trainer.log_every_n_steps=2"]
KILL_STEP = 9  # in the middle of the second epoch, after the first epoch's checkpoint

# Runs the CLI with a callback that sends this process a signal once training reaches a global step:
# the test's own switch, kept out of the library and its config.
KILLING_DRIVER = """\
import os, signal, sys
import lightning as L
from orca_lora import cli
from orca_lora.finetune import stage

step, signal_name = int(sys.argv[1]), sys.argv[2]

class SignalAtStep(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == step:
            os.kill(os.getpid(), getattr(signal, signal_name))

make_trainer = stage.make_trainer

def make_trainer_with_signal(*args, **kwargs):
    trainer, checkpoint = make_trainer(*args, **kwargs)
    trainer.callbacks.append(SignalAtStep())
    return trainer, checkpoint

stage.make_trainer = make_trainer_with_signal
sys.exit(cli.main(sys.argv[3:]))
"""


# the driver script lies outside the repository: make sure it imports this checkout's package
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def sets(overrides: list[str]) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


def run_here(overrides: list[str], capsys) -> tuple[int, str]:
    """`orca-lora run` in this process, which has imported the training stack already (a subprocess
    imports it again: about 9 s here): its exit code and stderr."""
    code = cli.main(["run", str(QUICKSTART), *sets(overrides)])
    return code, capsys.readouterr().err


def kill_at_step(tmp_path: Path, overrides: list[str], signal_name: str) -> subprocess.CompletedProcess:
    driver = tmp_path / "killing_driver.py"
    driver.write_text(KILLING_DRIVER)
    command = [sys.executable, str(driver), str(KILL_STEP), signal_name, "run", str(QUICKSTART), *sets(overrides)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)


@pytest.fixture(scope="module")
def uninterrupted(tiny_settings, tmp_path_factory) -> Path:
    """The reference: the resumable setting, run through once, here (on the same machine, so the
    subprocesses' numbers must equal it bit for bit)."""
    root = tmp_path_factory.mktemp("reference")
    return run_pipeline(load_config(QUICKSTART, tiny_settings + RESUMABLE + [f"output.root={root}"])).directory


def logged_rows(run: RunFiles) -> list[dict[str, str]]:
    return training_log_before(run, step=10**9)


def assert_same_numbers(directory: Path, reference: Path) -> None:
    run, expected = RunFiles(directory), RunFiles(reference)
    assert read_metrics(run).test_error == read_metrics(expected).test_error
    assert read_metrics(run).best_val_error == read_metrics(expected).best_val_error
    errors, reference_errors = read_sample_errors(run), read_sample_errors(expected)
    assert np.array_equal(errors.test, reference_errors.test) and np.array_equal(errors.val, reference_errors.val)


def test_run_killed_at_a_fixed_step_resumes_bit_for_bit(tiny_overrides, uninterrupted, tmp_path, capsys):
    overrides = tiny_overrides + RESUMABLE
    killed = kill_at_step(tmp_path, overrides, "SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    run = RunFiles(tmp_path / "runs" / "tiny")
    logged_before = logged_rows(run)
    assert run.last_checkpoint.is_file() and not run.metrics.exists()
    stopped = torch.load(run.last_checkpoint, map_location="cpu", weights_only=False)
    assert stopped["epoch"] == 0, "killed before the last epoch's checkpoint"

    code, stderr = run_here(overrides, capsys)
    assert code == 0, stderr[-3000:]
    assert "resuming stage 3" in stderr
    assert read_marker(run, "stage3").finished
    finished = torch.load(run.last_checkpoint, map_location="cpu", weights_only=False)
    assert finished["global_step"] > stopped["global_step"]
    assert_same_numbers(run.root, uninterrupted)
    logged_after = logged_rows(run)
    assert logged_after, "the resumed run logs its training"
    kept = [row for row in logged_before if int(row["step"]) < 6]  # the checkpoint is of the end of epoch 0
    assert kept and logged_after[: len(kept)] == kept, "rows logged before the checkpoint are kept"
    assert logged_rows(RunFiles(uninterrupted)) == logged_after, "and the log is the uninterrupted run's"
    marker = read_marker(run, "stage3")
    assert 0 < marker.earlier_seconds < marker.seconds, "stage_seconds counts the killed attempt too"
    assert read_metrics(run).stage_seconds["stage3"] == marker.seconds


def test_sigterm_exits_non_zero_and_a_truncated_checkpoint_is_set_aside(tiny_overrides, uninterrupted, tmp_path,
                                                                        capsys):
    overrides = tiny_overrides + RESUMABLE
    stopped = kill_at_step(tmp_path, overrides, "SIGTERM")
    assert stopped.returncode == INTERRUPTED_EXIT_CODE, stopped.stderr[-3000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert message == "orca-lora run: interrupted by SIGTERM during stage3; run the same command to resume"
    run = RunFiles(tmp_path / "runs" / "tiny")
    assert not run.metrics.exists() and not read_marker(run, "stage3").finished

    with open(run.last_checkpoint, "r+b") as checkpoint:  # what a full disk during a copy leaves
        checkpoint.truncate(checkpoint.seek(0, os.SEEK_END) // 2)
    code, stderr = run_here(overrides, capsys)
    assert code == 0, stderr[-3000:]
    assert f"checkpoint {run.last_checkpoint} does not load" in stderr
    assert list(run.stage("stage3").glob("last.ckpt.corrupt-*"))
    assert not list(run.checkpoints.glob("*-v1.ckpt")), "the restart leaves no second set of checkpoints"
    assert_same_numbers(run.root, uninterrupted)  # restarted afresh, so the same numbers again


def test_a_second_launch_on_a_busy_run_directory_is_refused(tiny_overrides, tmp_path, capsys):
    overrides = tiny_overrides + ["stage1.epochs=0", "stage2.enabled=false", "trainer.max_epochs=50"]
    command = [sys.executable, "-m", "orca_lora.cli", "run", str(QUICKSTART), *sets(overrides)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=ENV)
    lock = tmp_path / "runs" / "tiny" / LOCK_FILE
    try:
        deadline = time.time() + 120
        while not lock.is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert cli.main(["run", str(QUICKSTART), *sets(overrides)]) == 2  # here: the lock is another process's
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in error, error
    finally:
        first.kill()
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid, "the refused launch leaves the holder's lock alone"


def test_stale_and_foreign_locks(tiny_overrides, tmp_path, caplog):
    from orca_lora.run_lock import RunDirectoryBusy, RunLock

    run = RunFiles(tmp_path / "run")
    run.root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.root / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": time.time() - 60}))
    caplog.set_level("WARNING", logger="orca_lora")
    with RunLock(run):
        assert json.loads((run.root / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not (run.root / LOCK_FILE).exists()

    (run.root / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-17", "started": time.time() - 3600}))
    with pytest.raises(RunDirectoryBusy, match=r"pid 1 on host node-17 \(started 3600 s ago\)"):
        with RunLock(run):
            pass


def test_damaged_caches_and_markers_are_named_and_rebuilt(tiny_overrides, tmp_path, caplog):
    overrides = tiny_overrides + ["stage1.epochs=0", "stage2.enabled=false", f"data_root={tmp_path / 'data'}"]
    config = load_config(QUICKSTART, overrides)
    run_pipeline(config, last_stage=2)  # builds both caches; stage 3 adds nothing to what is checked here
    darcy = next((tmp_path / "data" / "darcy").glob("generated_*.npz"))
    body = next((tmp_path / "data" / "source").glob("offline_*.safetensors"))
    assert digest_path(darcy).is_file() and digest_path(body).is_file()
    darcy.write_bytes(os.urandom(2000))
    with open(body, "r+b") as weights:
        weights.truncate(1000)
    marker = RunFiles(tmp_path / "runs" / "tiny").marker("stage2")
    marker.write_text("{not json")
    caplog.set_level("WARNING", logger="orca_lora")
    result = run_pipeline(config, last_stage=2)
    for damaged in (darcy, body):
        assert f"cached {damaged} does not match its content hash" in caplog.text
        assert damaged.is_file() and digest_path(damaged).is_file()
    assert f"{marker}: not valid JSON" in caplog.text and "redoing stage2" in caplog.text
    assert read_marker(RunFiles(result.directory), "stage2").finished


@pytest.mark.parametrize("value", ["stage3.lr=nan", "stage3.alpha=inf", "stage2.alpha0=-inf"])
def test_non_finite_config_values_are_refused(value, tiny_overrides, capsys):
    code = cli.main(["check", str(QUICKSTART), *sets(tiny_overrides + [value])])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.endswith("is not a finite number; give a finite value")
    assert error.startswith(f"orca-lora check: error: {value.split('=')[0]}:")


def test_diverged_training_fails_the_run(tiny_overrides, tmp_path, capsys):
    overrides = tiny_overrides + ["stage1.epochs=0", "stage2.enabled=false", "trainer.max_epochs=2",
                                  "stage3.lr=1e30", "stage3.grad_clip=0"]
    # in this process: a divergence needs no process of its own
    assert cli.main(["run", str(QUICKSTART), *sets(overrides)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("orca-lora run: error: stage 3 diverged") and "stage3.lr" in error
    run = RunFiles(tmp_path / "runs" / "tiny")
    assert not run.metrics.exists() and not read_marker(run, "stage3").finished
