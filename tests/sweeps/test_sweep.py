import json
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orca_lora.config import ConfigError
from orca_lora.config_load import load_config
from orca_lora.sweeps import sweep as sweeps
from orca_lora.sweeps import workers as sweep_workers
from orca_lora.sweeps.sweep import format_value, grid_points, load_sweep, print_commands, run_sweep

REPO = Path(__file__).resolve().parents[2]
TINY_POINTS = ["darcy_rank1_uniform", "darcy_rank2_uniform", "near_rank1_uniform", "near_rank2_uniform",
               "darcy_rank2_gap-aware"]


def test_format_value_writes_what_set_reads():
    assert [format_value(v) for v in (True, False, None, 0.5, 3, "darcy", [2, 2])] == \
        ["true", "false", "null", "0.5", "3", "darcy", "[2,2]"]


def test_grid_points_are_the_union_of_products_in_file_order():
    grids = [{"task": {"a": {"task.name": "darcy"}, "b": {"task.name": "procedural", "task.n_classes": 4}},
              "stage3.rank": [1, 4]},
             {"task": {"a": {"task.name": "darcy"}}, "stage3.rank": [4, 8]}]
    points = grid_points(grids)
    assert [p.name for p in points] == ["a_rank1", "a_rank4", "b_rank1", "b_rank4", "a_rank8"]
    assert points[2].overrides == ("task.name=procedural", "task.n_classes=4", "stage3.rank=1")
    assert points[2].labels == {"task": "b", "rank": "rank1"}


def test_axes_sharing_a_last_key_part_keep_their_full_keys():
    points = grid_points([{"stage3.rank": [2], "stage2.rank": [3]}])
    assert points[0].name == "stage3.rank2_stage2.rank3"


@pytest.mark.parametrize("grids, message", [
    ([{"stage3.rank": []}], "non-empty list"),
    ([{"task": {"a": "darcy"}}], "must map config keys to values"),
    ([{}], "non-empty mapping of axes"),
    ([{"task": {"a": {"task.name": "darcy"}}}, {"task": {"a": {"task.name": "cifar10"}}}], "both named 'a'"),
])
def test_bad_grids_are_refused_naming_the_axis(grids, message):
    with pytest.raises(ConfigError, match=message):
        grid_points(grids)


@pytest.mark.parametrize("text, message", [
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1]}}\nextra: 1\n", r"unknown key\(s\) \['extra'\]"),
    ("name: s\ngrid: {{stage3.rank: [1]}}\n", "missing 'base'"),
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1]}}\ngrids: []\n", "exactly one of 'grid'"),
    ("name: s\nbase: {base}\ngrid: {{stage3.rank: [1, 0]}}\n", r"point rank0: .*stage3.rank"),
    ("name: s\nbase: {base}\ngrid: {{stage3.method: [lora, loar]}}\n", r"point methodloar: .*stage3.method"),
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text.format(base=REPO / "configs" / "quickstart.yaml"))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path, [f"output.root={tmp_path / 'runs'}"])
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


def test_one_failing_point_does_not_stop_the_others(tmp_path, tiny_sweep_file, monkeypatch):
    sweep = load_sweep(tiny_sweep_file, [f"output.root={tmp_path / 'runs'}"])
    ran = []

    def fake_pipeline(config):
        from orca_lora.pipeline import RunResult

        ran.append(config.output.name)
        if config.output.name == "near_rank1_uniform":
            raise RuntimeError("out of memory")
        return RunResult(tmp_path / "runs" / config.output.name, None)

    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fake_pipeline)
    result = run_sweep(sweep)
    assert ran == TINY_POINTS[:2] + TINY_POINTS[2:]
    assert result.failed == {"near_rank1_uniform": "RuntimeError: out of memory"}
    assert len(result.finished) == 4 and result.skipped == []


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


def test_a_failed_dependency_stops_its_readers_in_process(reading_sweep, tmp_path, monkeypatch):
    ran = []

    def fake_pipeline(config):
        from orca_lora.pipeline import RunResult

        ran.append(config.output.name)
        if config.output.name == "a_seed0_flat":
            raise RuntimeError("diverged")
        return RunResult(tmp_path / config.output.name, None)

    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fake_pipeline)
    monkeypatch.setattr("orca_lora.reports.run_plots.plot_run", lambda directory: [])
    result = run_sweep(reading_sweep)
    assert ran == ["a_seed0_flat", "a_seed1_flat", "a_seed1_reader"]
    assert result.failed["a_seed0_reader"] == "not run: it reads point a_seed0_flat, which failed"


def test_workers_start_a_reader_once_its_dependency_finished(reading_sweep, monkeypatch):
    import threading
    import time

    events, lock = [], threading.Lock()

    def fake_worker(sweep, point):
        with lock:
            events.append(("start", point.name))
        time.sleep(0.05 if point.name.endswith("flat") else 0.0)
        with lock:
            events.append(("end", point.name))
        return "exit code 1" if point.name == "a_seed1_flat" else None

    monkeypatch.setattr(sweeps, "build_shared_inputs", lambda configs: None)
    monkeypatch.setattr(sweep_workers, "worker_pool", lambda workers, threads: ThreadPoolExecutor(workers))
    monkeypatch.setattr(sweep_workers, "run_in_worker", fake_worker)
    result = run_sweep(reading_sweep, workers=2)
    assert events.index(("end", "a_seed0_flat")) < events.index(("start", "a_seed0_reader"))
    assert ("start", "a_seed1_reader") not in events
    assert result.failed == {"a_seed1_flat": "exit code 1",
                             "a_seed1_reader": "not run: it reads point a_seed1_flat, which failed"}


@pytest.mark.parametrize("options, message", [
    ('{x: {stage3.rank: 1, data_root: {point: "nope"}}}', r"names 'nope', no point of the sweep"),
    ('{x: {stage3.rank: 1, data_root: {point: "{lr}"}}}', r"not filled by the point's axes \['role'\]"),
    ('{x: {stage3.rank: 1, data_root: {point: y}}, y: {stage3.rank: 2, data_root: {point: x}}}', "in a cycle"),
    ('{x: {stage3.rank: 1, data_root: {run: y}}}', r"must be \{point: NAME\}"),
])
def test_bad_point_references_are_refused(tmp_path, options, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\nbase: {REPO / 'configs' / 'quickstart.yaml'}\ngrid:\n  role: {options}\n")
    with pytest.raises(ConfigError, match=message):
        load_sweep(path, [f"output.root={tmp_path / 'runs'}"])
