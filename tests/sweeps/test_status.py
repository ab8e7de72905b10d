import json
import os
import re
import socket
import time
from pathlib import Path

from orca_lora import cli
from orca_lora.config import to_yaml
from orca_lora.records import StageRecord
from orca_lora.run_files import RunFiles, write_marker
from orca_lora.sweep_files import write_failure
from orca_lora.sweeps.status import point_status
from orca_lora.sweeps.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]
FIVE = f"""\
name: five
base: {REPO / 'configs' / 'quickstart.yaml'}
grid:
  stage3.rank: [1, 2, 3, 4, 5]
"""


def test_status_reads_each_state_from_the_run_directories(tmp_path, capsys):
    path = tmp_path / "five.yaml"
    path.write_text(FIVE)
    sweep = load_sweep(path, [f"output.root={tmp_path}"], check=False)
    finished, failed, running, interrupted, untouched = (RunFiles(sweep.directory / p.name) for p in sweep.points)
    finished.root.mkdir(parents=True)
    finished.config.write_text(to_yaml(sweep.point_config(sweep.points[0])))
    finished.metrics.write_text("{}")
    write_failure(failed, "RuntimeError: CUDA out of memory.\nTried to allocate 2 GiB")
    running.root.mkdir()
    (running.root / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "started": time.time()}))
    write_marker(interrupted, "stage2", StageRecord("hash"))

    assert cli.main(["sweep", str(path), "--status", "--set", f"output.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "5 points, 1 finished, 1 running, 1 failed, 1 interrupted, 1 not started" in out
    rows = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert re.fullmatch(r"rank1 +finished", rows["rank1"])
    assert re.fullmatch(r"rank2 +failed +RuntimeError: CUDA out of memory. Tried to allocate 2 GiB", rows["rank2"])
    assert re.fullmatch(rf"rank3 +running +host {socket.gethostname()}, pid {os.getpid()}, since [-0-9: ]+",
                        rows["rank3"])
    assert re.fullmatch(r"rank4 +interrupted +stopped in stage2; the next launch resumes it", rows["rank4"])
    assert re.fullmatch(r"rank5 +not started", rows["rank5"])
    assert not (untouched.root).exists()


def test_a_stale_lock_is_not_running_and_another_config_is_not_finished(tmp_path):
    path = tmp_path / "five.yaml"
    path.write_text(FIVE)
    sweep = load_sweep(path, [f"output.root={tmp_path}"], check=False)
    run = RunFiles(sweep.directory / "rank1")
    run.root.mkdir(parents=True)
    run.config.write_text(to_yaml(sweep.point_config(sweep.points[1])))  # rank 2's
    run.metrics.write_text("{}")
    dead = {"pid": 2 ** 22 + 1, "host": socket.gethostname(), "started": 0}  # above Linux's largest pid
    (run.root / "run.lock").write_text(json.dumps(dead))
    status = point_status(sweep, sweep.points[0])
    assert status.state == "not started"
    assert status.detail == "finished with another config: the next launch redoes it"
