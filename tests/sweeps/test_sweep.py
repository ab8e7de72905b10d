import json
import shlex
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from orca_lora.config import ConfigError
from orca_lora.config_load import load_config
from orca_lora.errors import RunInterrupted
from orca_lora.run_files import RunFiles
from orca_lora.run_lock import RunDirectoryBusy
from orca_lora.sweep_files import read_failure
from orca_lora.sweeps import sweep as sweeps
from orca_lora.sweeps.stopping import SweepInterrupted
from orca_lora.sweeps.sweep import load_sweep, print_commands, run_sweep
from orca_lora.sweeps.workers import FAILED, FINISHED, PointOutcome

REPO = Path(__file__).resolve().parents[2]
TINY_POINTS = ["darcy_rank1_uniform", "darcy_rank2_uniform", "near_rank1_uniform", "near_rank2_uniform",
               "darcy_rank2_gap-aware"]


@pytest.mark.parametrize("text, message", [
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1]}}\nextra: 1\n", r"^unknown key\(s\) \['extra'\]"),
    ("name: s\ngrid: {{stage3.rank: [1]}}\n", "^missing 'base'"),
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1]}}\ngrids: []\n", "^give exactly one of 'grid'"),
    ("name: s\nbase: {base}\ngrids: []\n", r"^empty grid: .* has `grids: \[\]`"),
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1, 0]}}\n", r"^point rank0: stage3.rank"),
    ("name: s\nbase: {base}\ngrid: {{stage3.method: [lora, loar]}}\n", r"^point methodloar: stage3.method"),
    ("name: s\nbase: {base}\ngrid: {{stage3.rnk: [1]}}\n", r"^point rnk1: unknown key 'stage3.rnk'"),
    ("name: s\nbase: {base}\nset: [trainer.max_epoch=3]\ngrid: {{stage3.rank: [1]}}\n",
     r"^unknown key 'trainer.max_epoch'"),
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1]}}\nslurm: {{partiton: gpu}}\n",
     r"^unknown slurm setting\(s\) \['partiton'\]"),
])
def test_bad_sweep_files_fail_before_anything_runs_naming_the_problem_first(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text.format(base=REPO / "configs" / "quickstart.yaml"))
    with pytest.raises(ConfigError, match=message) as refused:
        load_sweep(path, [f"output.root={tmp_path / 'runs'}"])
    assert len(str(refused.value).replace(str(path), "")) < 250, "no list of every override"
    assert not (tmp_path / "runs").exists()


def test_printed_commands_resolve_to_the_points_configs(tmp_path, tiny_sweep_file):
    sweep = load_sweep(tiny_sweep_file, [f"output.root={tmp_path / 'runs'}"])
    lines = print_commands(sweep)
    assert len(lines) == len(sweep.points) == 5
    for line, point in zip(lines, sweep.points):
        words = shlex.split(line)
        assert words[:3] == ["orca-lora", "run", str(sweep.base)]
        config = load_config(words[2], words[4::2])
        assert config == sweep.point_config(point)
        assert config.output.root == str(tmp_path / "runs" / "tiny") and config.output.name == point.name


def fake_pipeline(ran: list, outcomes: dict):
    """run_pipeline's stand-in: records the point, raises what `outcomes` names for it."""
    def run(config):
        from orca_lora.pipeline import RunResult

        ran.append(config.output.name)
        if config.output.name in outcomes:
            raise outcomes[config.output.name]
        return RunResult(Path(config.output.root) / config.output.name, None)
    return run


def test_one_failing_point_does_not_stop_the_others(tmp_path, tiny_sweep_file, monkeypatch):
    sweep = load_sweep(tiny_sweep_file, [f"output.root={tmp_path / 'runs'}"])
    ran = []
    monkeypatch.setattr("orca_lora.pipeline.run_pipeline",
                        fake_pipeline(ran, {"near_rank1_uniform": RuntimeError("out of memory")}))
    result = run_sweep(sweep)
    assert ran == TINY_POINTS
    assert result.failed == {"near_rank1_uniform": "RuntimeError: out of memory"}
    assert len(result.finished) == 4 and result.skipped == [] and result.elsewhere == {}
    failed = RunFiles(sweep.directory / "near_rank1_uniform")
    assert read_failure(failed) == "RuntimeError: out of memory"
    assert "sweep point near_rank1_uniform failed" in (failed.root / "run.log").read_text()


@pytest.mark.slow
def test_the_sweep_writes_every_point_its_table_and_plots(tiny_sweep):
    assert sorted(p.name for p in tiny_sweep.iterdir() if (p / "metrics.json").is_file()) == sorted(TINY_POINTS)
    recorded = json.loads((tiny_sweep / "sweep.json").read_text())
    assert [point["name"] for point in recorded["points"]] == TINY_POINTS
    for name in ("table.csv", "table.md", "plots/error_vs_rank.png", "plots/gaps_by_block.png",
                 "plots/alignment.png"):
        assert (tiny_sweep / name).is_file(), name
    assert "exit code" not in (tiny_sweep / "darcy_rank1_uniform" / "run.log").read_text()
    # one stage-1 result per task (its points share seed, task and stage 1), each copied or computed once
    assert len(list((tiny_sweep / sweeps.SHARED_STAGES / "stage1").iterdir())) == 2
    gap_aware = json.loads((tiny_sweep / "darcy_rank2_gap-aware" / "metrics.json").read_text())
    uniform = json.loads((tiny_sweep / "darcy_rank2_uniform" / "metrics.json").read_text())
    assert gap_aware["gap_aware"] and not uniform["gap_aware"]
    assert gap_aware["trainable_params"] <= uniform["trainable_params"]


@pytest.mark.slow
def test_a_rerun_skips_every_finished_point(tiny_sweep, tiny_settings, monkeypatch):
    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", lambda config: pytest.fail("a finished point ran"))
    sweep = load_sweep(tiny_sweep.parent.parent / "tiny_sweep.yaml",
                       tiny_settings + [f"output.root={tiny_sweep.parent}"])
    result = run_sweep(sweep)
    assert result.skipped == TINY_POINTS and result.finished == [] and result.failed == {}
    assert sweeps.is_finished(sweep, sweep.points[0])


# `data_root` stands in for a key that reads another run (stage2.posterior_run): any value shows the mechanism
READING_SWEEP = """\
name: reading
base: {base}
grids:
  - task: {{a: {{task.name: darcy}}}}
    seed: [0, 1]
    role: {{reader: {{stage3.rank: 2, data_root: {{point: "{{task}}_{{seed}}_flat"}}}}}}
  - task: {{a: {{task.name: darcy}}}}
    seed: [0, 1]
    role: {{flat: {{stage3.rank: 1}}}}
"""
READING_ORDER = ["a_seed0_flat", "a_seed0_reader", "a_seed1_flat", "a_seed1_reader"]


@pytest.fixture
def reading_sweep(tmp_path):
    path = tmp_path / "reading.yaml"
    path.write_text(READING_SWEEP.format(base=REPO / "configs" / "quickstart.yaml"))
    return load_sweep(path, [f"output.root={tmp_path / 'runs'}"])


def test_a_point_reading_another_gets_its_run_directory_and_runs_after_it(reading_sweep):
    assert [point.name for point in reading_sweep.points] == READING_ORDER
    reader = reading_sweep.points[1]
    assert reader.after == ("a_seed0_flat",)
    assert reading_sweep.point_config(reader).data_root == str(reading_sweep.directory / "a_seed0_flat")
    printed = [shlex.split(line) for line in print_commands(reading_sweep)]
    assert [next(word for word in words if word.startswith("output.name=")) for words in printed] == \
        [f"output.name={name}" for name in READING_ORDER]


def test_a_failed_dependency_stops_its_readers_in_process(reading_sweep, monkeypatch):
    ran = []
    monkeypatch.setattr("orca_lora.pipeline.run_pipeline",
                        fake_pipeline(ran, {"a_seed0_flat": RuntimeError("diverged")}))
    monkeypatch.setattr("orca_lora.reports.run_plots.plot_run", lambda directory: [])
    result = run_sweep(reading_sweep)
    assert ran == ["a_seed0_flat", "a_seed1_flat", "a_seed1_reader"]
    assert result.failed["a_seed0_reader"] == "not run: it reads point a_seed0_flat, which failed"
    assert read_failure(RunFiles(reading_sweep.directory / "a_seed0_reader")) == result.failed["a_seed0_reader"]


def test_a_point_another_sweep_runs_is_left_to_it_and_not_failed(reading_sweep, monkeypatch):
    busy = RunDirectoryBusy("runs/a_seed0_flat is in use by pid 1 on host h (started 3 s ago); wait for it")
    ran = []
    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fake_pipeline(ran, {"a_seed0_flat": busy}))
    monkeypatch.setattr("orca_lora.reports.run_plots.plot_run", lambda directory: [])
    result = run_sweep(reading_sweep)
    assert result.failed == {} and sorted(result.finished) == ["a_seed1_flat", "a_seed1_reader"]
    assert result.elsewhere == {
        "a_seed0_flat": "runs/a_seed0_flat is in use by pid 1 on host h (started 3 s ago)",
        "a_seed0_reader": "not run here: it reads point a_seed0_flat, which another sweep runs"}
    assert read_failure(RunFiles(reading_sweep.directory / "a_seed0_flat")) is None


def test_a_signal_stops_the_sweep_after_noting_it_in_the_run_log(reading_sweep, monkeypatch):
    ran = []
    monkeypatch.setattr("orca_lora.pipeline.run_pipeline",
                        fake_pipeline(ran, {"a_seed0_reader": RunInterrupted("SIGINT", "stage2")}))
    monkeypatch.setattr("orca_lora.reports.run_plots.plot_run", lambda directory: [])
    with pytest.raises(SweepInterrupted, match="^interrupted by SIGINT: 1 running point.* 2 not started"):
        run_sweep(reading_sweep)
    assert ran == ["a_seed0_flat", "a_seed0_reader"]
    log = (reading_sweep.directory / "a_seed0_reader" / "run.log").read_text()
    assert "interrupted by SIGINT during stage2; the next launch of the sweep resumes it" in log


class ThreadPool:
    """WorkerPool's interface on threads: `run` stands in for a worker's point."""

    def __init__(self, size, run):
        self.size, self.run, self.running = size, run, {}
        self.executor = ThreadPoolExecutor(size)

    @property
    def busy(self):
        return list(self.running.values())

    @property
    def has_room(self):
        return len(self.running) < self.size

    def start(self, name, config):
        self.running[self.executor.submit(self.run, name)] = name

    def wait(self):
        finished, _ = wait(self.running, return_when=FIRST_COMPLETED)
        return [(self.running.pop(future), future.result()) for future in finished]

    def stop(self):
        return []

    def close(self):
        self.executor.shutdown()


def test_workers_start_a_reader_once_its_dependency_finished(reading_sweep, monkeypatch):
    events, lock = [], threading.Lock()

    def fake_worker(name):
        with lock:
            events.append(("start", name))
        time.sleep(0.05 if name.endswith("flat") else 0.0)
        with lock:
            events.append(("end", name))
        return PointOutcome(FAILED, "exit code 1") if name == "a_seed1_flat" else PointOutcome(FINISHED)

    monkeypatch.setattr(sweeps, "build_shared_inputs", lambda configs: None)
    monkeypatch.setattr(sweeps, "WorkerPool", lambda workers, threads: ThreadPool(workers, fake_worker))
    result = run_sweep(reading_sweep, workers=2)
    assert events.index(("end", "a_seed0_flat")) < events.index(("start", "a_seed0_reader"))
    assert ("start", "a_seed1_reader") not in events
    assert result.failed == {"a_seed1_flat": "exit code 1",
                             "a_seed1_reader": "not run: it reads point a_seed1_flat, which failed"}
