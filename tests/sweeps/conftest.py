"""Sweeps launched for real, shared by the launch tests (each launch imports the training stack afresh,
which is what they cost): one small sweep of four tiny points, one reading another's run, logged with
TensorBoard as well as CSV.

`stopped_sweep`: `--workers 2` stopped by SIGTERM, then again by SIGINT, each once two points run; then
two launches at once finish it. `rehearsed_sweep`: the same points (plus one with a bad config) as
submitit jobs on this machine (its local executor: real processes, no SLURM), one of them sent submitit's
preemption signal during stage 3; its metrics are compared with the stopped sweep's."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOUR_SWEEP = """\
name: {name}
base: {base}
set: [trainer.logger=tensorboard]
grids:
  - task: {{darcy: {{task.name: darcy}}}}
    method: {{flat: {{stage3.method: ibp-lora, stage2.allocation: flat}}}}
  - task: {{darcy: {{task.name: darcy}}}}
    stage3.rank: [1]
  - task: {{darcy: {{task.name: darcy}}}}
    method: {{long: {{stage3.rank: 2, trainer.max_epochs: 4}}}}
  - task: {{darcy: {{task.name: darcy}}}}
    method:
      posterior:
        stage2.allocation: ibp-posterior
        stage2.match_uniform_budget: true
        stage2.posterior_run: {{point: "{{task}}_flat"}}
{extra}"""
FOUR_POINTS = ["darcy_flat", "darcy_rank1", "darcy_long", "darcy_posterior"]
# passes every check a login node makes; the job refuses it (Lightning's spawned workers run only `fit`)
BAD_POINT = """\
  - task: {darcy: {task.name: darcy}}
    method: {ddp-spawn: {trainer.strategy: ddp_spawn}}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCH_SECONDS = 900  # each launch imports torch in 1-3 processes: minutes on a loaded 2-core machine
AFTER_SIGNAL_SECONDS = 10.0


def write_four_sweep(directory: Path, name: str, extra: str = "") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(FOUR_SWEEP.format(name=name, base=REPO / "configs" / "quickstart.yaml", extra=extra))
    return path


@dataclass
class Launch:
    process: subprocess.Popen
    log: Path  # stdout and stderr, one file each: .out, .err

    @property
    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text()

    @property
    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text()


def launch(sweep_file: Path, settings: list[str], log: Path, *flags: str) -> Launch:
    """`orca-lora sweep` in a session of its own (so the test can find every process it starts)."""
    sets = [part for item in settings for part in ("--set", item)]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        command = [sys.executable, "-m", "orca_lora.cli", "sweep", str(sweep_file), *sets, *flags]
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env=ENV, start_new_session=True)
    return Launch(process, log)


def session_processes(session: int) -> list[int]:
    """The live processes of a session (its leader's pid), wherever they were re-parented."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session and "Z" not in (entry / "stat").read_text().split()[2]:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                pass
    return found


def locked_points(directory: Path) -> list[str]:
    return sorted(lock.parent.name for lock in directory.glob("*/run.lock"))


def point_directories(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.is_dir() and not path.name.startswith("_"))


def finished_points(directory: Path) -> list[str]:
    return sorted(metrics.parent.name for metrics in directory.glob("*/metrics.json"))


@dataclass
class Stop:
    """A launch stopped by a signal to its main process once `running` points held their locks."""
    signal_name: str
    code: int
    stderr: str
    running: list[str]  # the points running when the signal was sent
    present: list[str]  # the point directories there when the signal was sent
    started: list[str]  # the point directories there after the stop
    finished: list[str]  # the points with metrics after the stop (a running point may finish before it stops)
    left_alive: list[int]  # processes of the launch still alive AFTER_SIGNAL_SECONDS after the signal
    seconds_to_empty: float  # from the signal to the last process of the launch gone


def stop_when_running(run: Launch, directory: Path, signal_number: signal.Signals, count: int = 2) -> Stop:
    deadline = time.monotonic() + LAUNCH_SECONDS
    while run.process.poll() is None and len(locked_points(directory)) < count:
        assert time.monotonic() < deadline, "no two points started"
        time.sleep(0.05)
    running, present = locked_points(directory), point_directories(directory)
    os.kill(run.process.pid, signal_number)  # the main process alone, not its session
    signalled = time.monotonic()
    run.process.wait(timeout=60)
    while session_processes(run.process.pid) and time.monotonic() - signalled < AFTER_SIGNAL_SECONDS:
        time.sleep(0.1)
    seconds, left = time.monotonic() - signalled, session_processes(run.process.pid)
    for pid in left:  # not to leak into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return Stop(signal_number.name, run.process.returncode, run.stderr, running, present,
                point_directories(directory), finished_points(directory), left, seconds)


@dataclass
class StoppedSweep:
    directory: Path
    points: list[str] = field(default_factory=lambda: list(FOUR_POINTS))
    stops: dict[str, Stop] = field(default_factory=dict)  # by signal name
    finishing: list[Launch] = field(default_factory=list)  # the two launches at once that finished it


@pytest.fixture(scope="session")
def stopped_sweep(tiny_settings, tmp_path_factory) -> StoppedSweep:
    root = tmp_path_factory.mktemp("stopped")
    sweep_file, settings = write_four_sweep(root, "four"), tiny_settings + [f"output.root={root / 'runs'}"]
    stopped = StoppedSweep(root / "runs" / "four")
    for number in (signal.SIGTERM, signal.SIGINT):
        run = launch(sweep_file, settings, root / number.name, "--workers", "2")
        stopped.stops[number.name] = stop_when_running(run, stopped.directory, number)
    stopped.finishing = [launch(sweep_file, settings, root / f"finish{index}") for index in range(2)]
    for run in stopped.finishing:
        run.process.wait(timeout=LAUNCH_SECONDS)
    return stopped


class Preemption(threading.Thread):
    """Sends submitit's preemption signal (USR2) to the job running the point in `directory` once its
    stage 3 has saved a first checkpoint (the job's pid is the one in the point's run.lock)."""

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        self.directory, self.pid = directory, None

    def run(self) -> None:
        lock, checkpoint = self.directory / "run.lock", self.directory / "stage3" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + LAUNCH_SECONDS
        while time.monotonic() < deadline and self.pid is None:
            if checkpoint.is_file() and lock.is_file():
                self.pid = json.loads(lock.read_text())["pid"]
                os.kill(self.pid, signal.SIGUSR2)
            time.sleep(0.02)


@dataclass
class Rehearsal:
    directory: Path
    submission: object  # slurm.Submission
    preempted_pid: int | None


@pytest.fixture(scope="session")
def rehearsed_sweep(stopped_sweep, tiny_settings, tmp_path_factory) -> Rehearsal:
    from orca_lora.sweeps.slurm import submit_sweep
    from orca_lora.sweeps.slurm_settings import slurm_settings
    from orca_lora.sweeps.sweep import load_sweep

    root = tmp_path_factory.mktemp("rehearsal")
    sweep = load_sweep(write_four_sweep(root, "four_slurm", BAD_POINT), tiny_settings + [f"output.root={root}"])
    preemption = Preemption(sweep.directory / "darcy_long")
    preemption.start()
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the jobs inherit it: the same arithmetic as the stopped sweep's
    try:
        submission = submit_sweep(sweep, slurm_settings({"cluster": "local", "time": 30}, {}))
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    preemption.join(timeout=1)
    return Rehearsal(sweep.directory, submission, preemption.pid)
