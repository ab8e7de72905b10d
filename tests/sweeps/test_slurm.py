"""The SLURM launcher: levels and arrays, the sbatch scripts submitit writes (with stand-ins for `sbatch`
and `srun`, nothing submitted), and the same jobs run by submitit's local executor (`rehearsed_sweep`)."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from orca_lora import cli
from orca_lora.sweeps.grid import SweepPoint
from orca_lora.sweeps.slurm import SLURM_FOLDER, chunked, dependency_levels

REPO = Path(__file__).resolve().parents[2]
# `data_root` stands in for a key that reads another run: nothing runs here
LEVELS_SWEEP = f"""\
name: levels
base: {REPO / 'configs' / 'quickstart.yaml'}
slurm: {{partition: debug, time: "1:30:00", gpus_per_job: 1, slurm_account: lab}}
grids:
  - task: {{a: {{task.name: darcy}}}}
    seed: [0, 1, 2]
    role: {{flat: {{stage3.rank: 1}}}}
  - task: {{a: {{task.name: darcy}}}}
    seed: [0]
    role: {{reader: {{stage3.rank: 2, data_root: {{point: "{{task}}_{{seed}}_flat"}}}}}}
"""


def test_a_point_goes_one_level_after_the_points_it_reads():
    points = [SweepPoint("a", {}, ()), SweepPoint("b", {}, (), after=("a",)), SweepPoint("c", {}, ()),
              SweepPoint("d", {}, (), after=("b", "c")), SweepPoint("e", {}, (), after=("done_earlier",))]
    assert [[point.name for point in level] for level in dependency_levels(points)] == \
        [["a", "c", "e"], ["b"], ["d"]]
    assert [len(chunk) for chunk in chunked(points, 2)] == [2, 2, 1]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """`srun` (which submitit looks for) and an `sbatch` that answers job ids 1001, 1002, ..."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    (folder / "sbatch").write_text('#!/bin/sh\nn=$(cat "$0.count" 2>/dev/null || echo 1000)\n'
                                   'echo $((n + 1)) > "$0.count"\necho "Submitted batch job $((n + 1))"\n')
    for name in ("srun", "sbatch"):
        os.chmod(folder / name, 0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("orca_lora.sweeps.slurm.build_shared_inputs", lambda configs: None)
    return folder


def test_the_sbatch_scripts_ask_for_what_the_sweep_and_the_flags_say(fake_slurm, tmp_path, capsys):
    path = tmp_path / "levels.yaml"
    path.write_text(LEVELS_SWEEP)
    code = cli.main(["sweep", str(path), "--set", f"output.root={tmp_path}", "--launcher", "slurm",
                     "--cpus-per-job", "4", "--array-parallelism", "1", "--max-array-size", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "job(s) 1001 (2 points), 1002 (1 points), 1003 (1 points)" in out
    scripts = {job: (tmp_path / "levels" / SLURM_FOLDER / f"{job}_submission.sh").read_text()
               for job in (1001, 1002, 1003)}
    for script in scripts.values():  # the file's settings, the flags, a submitit parameter passed through
        for line in ("--partition=debug", "--time=90", "--gres=gpu:1", "--cpus-per-task=4", "--account=lab",
                     "--job-name=orca-lora-levels", "--signal=USR2@90"):
            assert f"#SBATCH {line}\n" in script, line
    # level 0 (3 points) in arrays of at most 2, one job at a time; level 1 waits for both arrays
    assert "#SBATCH --array=0-1%1\n" in scripts[1001] and f"/{SLURM_FOLDER}/%A_%a_0_log.out" in scripts[1001]
    assert "--array" not in scripts[1002] and "--dependency" not in scripts[1001] + scripts[1002]
    assert "#SBATCH --dependency=afterany:1001:1002\n" in scripts[1003]
    plan = json.loads((tmp_path / "levels" / "sweep.json").read_text())
    assert [point["name"] for point in plan["points"]] == ["a_seed0_flat", "a_seed1_flat", "a_seed2_flat",
                                                           "a_seed0_reader"]


def test_without_sbatch_the_slurm_launcher_is_refused_naming_the_rehearsal(tmp_path, capsys, monkeypatch):
    path = tmp_path / "levels.yaml"
    path.write_text(LEVELS_SWEEP)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("orca_lora.sweeps.slurm.build_shared_inputs", lambda configs: pytest.fail("work done"))
    code = cli.main(["sweep", str(path), "--set", f"output.root={tmp_path}", "--launcher", "slurm"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("orca-lora sweep: error: no `sbatch` on this machine") and \
        "--slurm cluster=local" in err


def metrics(directory: Path) -> dict:
    return json.loads((directory / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("sweep_launches")
def test_the_jobs_give_the_local_launchers_metrics(rehearsed_sweep, stopped_sweep):
    result = rehearsed_sweep.submission.result
    assert sorted(result.finished) == sorted(stopped_sweep.points) and list(result.failed) == ["darcy_ddp-spawn"]
    for name in stopped_sweep.points:
        here, there = metrics(rehearsed_sweep.directory / name), metrics(stopped_sweep.directory / name)
        for key in ("test_error", "best_val_error", "trainable_params", "ranks", "posterior_ranks"):
            assert here[key] == there[key], (name, key)


@pytest.mark.slow
@pytest.mark.xdist_group("sweep_launches")
def test_a_preempted_job_is_requeued_and_finishes_bit_for_bit(rehearsed_sweep, stopped_sweep):
    assert rehearsed_sweep.preempted_pid is not None
    log = (rehearsed_sweep.directory / "darcy_long" / "run.log").read_text()
    assert log.count("===== sweep point darcy_long: attempt") == 2
    assert "preempted or at its time limit; submitit requeues the job" in log and "Requeued job" in log
    assert re.search(r"resuming stage 3 from .*last.ckpt", log)
    with np.load(rehearsed_sweep.directory / "darcy_long" / "stage3" / "sample_errors.npz") as here, \
            np.load(stopped_sweep.directory / "darcy_long" / "stage3" / "sample_errors.npz") as there:
        assert np.array_equal(here["test"], there["test"]) and np.array_equal(here["val"], there["val"])


@pytest.mark.slow
@pytest.mark.xdist_group("sweep_launches")
def test_a_point_with_a_bad_config_fails_once_and_is_not_requeued(rehearsed_sweep, tiny_settings, capsys):
    bad = rehearsed_sweep.directory / "darcy_ddp-spawn"
    reason = (bad / "failed.txt").read_text().strip()
    assert reason.startswith("ConfigError: trainer.strategy: 'ddp_spawn'")
    assert rehearsed_sweep.submission.result.failed["darcy_ddp-spawn"] == reason
    log = (bad / "run.log").read_text()
    assert log.count("===== sweep point darcy_ddp-spawn: attempt") == 1 and "Requeued" not in log
    sets = [part for item in tiny_settings + [f"output.root={rehearsed_sweep.directory.parent}"]
            for part in ("--set", item)]
    cli.main(["sweep", str(rehearsed_sweep.directory.parent / "four_slurm.yaml"), "--status", *sets])
    out = capsys.readouterr().out
    assert "5 points, 4 finished, 0 running, 1 failed, 0 interrupted, 0 not started" in out
    assert re.search(r"darcy_ddp-spawn +failed +ConfigError: trainer.strategy", out)
