"""Several training processes: rank 0 alone writes the run directory, the other ranks follow its stage
markers, and validation / test errors are exact (no sample scored twice)."""
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from orca_lora import pipeline, run_files
from orca_lora.config import ConfigError, TrainerConfig
from orca_lora.config_load import load_config
from orca_lora.data.tasks import build_task
from orca_lora.finetune.module import FinetuneModule
from orca_lora.finetune.stage import TaskDataModule, check_world_size, prepare_model, process_placement
from orca_lora.models.model import build_orca_model
from orca_lora.models.source import load_source_body
from orca_lora.records import FinetuneResult, StageRecord
from orca_lora.run_files import RunFiles

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STAGES = ("stage1", "stage2", "stage3")
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
# no stage-1/2 work: this file is about stage 3;
# 33 test samples: a padded DistributedSampler would score one of them twice
FAST = ["stage1.epochs=0", "stage2.enabled=false", "trainer.max_epochs=1", "task.n_test=33"]


@pytest.fixture
def restore_rank_zero():
    """Building a Trainer under a fake LOCAL_RANK sets Lightning's process-wide rank; later tests need it back."""
    saved = rank_zero_only.rank, utils_rank_zero_only.rank
    yield
    rank_zero_only.rank, utils_rank_zero_only.rank = saved


@pytest.mark.parametrize("env, devices, num_nodes, expected", [
    ({}, 1, 1, (0, 1)),
    ({}, 2, 1, (0, 2)),  # strategy auto with 2 CPU devices: Lightning picks ddp
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, 2, 1, (1, 2)),  # Lightning's ddp child
    ({"NODE_RANK": "1"}, 2, 2, (2, 4)),  # rank 0 of the second node: LOCAL_RANK alone would say 0
])
def test_process_placement_follows_the_launch_environment(env, devices, num_nodes, expected, monkeypatch,
                                                          restore_rank_zero):
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    placement = process_placement(TrainerConfig(devices=devices, num_nodes=num_nodes))
    assert (placement.global_rank, placement.world_size) == expected


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_strategies_whose_workers_run_only_fit_are_refused(strategy, restore_rank_zero):
    with pytest.raises(ConfigError, match=f"trainer.strategy: '{strategy}'.*use 'ddp'"):
        process_placement(TrainerConfig(devices=2, strategy=strategy))


def test_a_bad_trainer_setting_is_a_config_error(restore_rank_zero):
    with pytest.raises(ConfigError, match="trainer: .*invalid strategy name"):
        process_placement(TrainerConfig(strategy="dpp"))


def test_each_rank_needs_a_validation_sample():
    task = SimpleNamespace(val=list(range(1)), test=list(range(1)))
    check_world_size(task, 1)
    with pytest.raises(ValueError, match="the val split has 1 samples, fewer than the 2 training processes"):
        check_world_size(task, 2)


@pytest.mark.parametrize("size", [7, 8])
def test_evaluation_shards_cover_every_sample_once(size):
    dataset = TensorDataset(torch.arange(size))
    task = SimpleNamespace(train=dataset, val=dataset)
    seen = []
    for rank in range(3):
        data = TaskDataModule(task, batch_size=2, workers=0, seed=0)
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        seen += [int(i) for (batch,) in data.val_dataloader() for i in batch]
    assert sorted(seen) == list(range(size))
    padded = [i for rank in range(3) for i in DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False)]
    assert len(padded) == 9, "the padded sampler repeats samples, which is what the shards avoid"


def write_marker(directory: Path, record: dict) -> None:
    """A marker as rank 0 writes it (through run_files), in `directory` (a run's stage folder)."""
    run_files.write_marker(RunFiles(directory.parent), directory.name, StageRecord(**record))


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_follower_rank_reuses_finished_stages_and_writes_nothing(tmp_path):
    config = load_config(None)
    finished = {"hash": pipeline.stage_hash(config, "stage1"), "finished": True, "seconds": 1.0, "result": {"x": 1}}
    write_marker(tmp_path / "stage1", finished)
    before = tree(tmp_path)
    record = pipeline._staged("stage1", config, RunFiles(tmp_path), lambda: pytest.fail("stage 1 ran twice"), 1)
    assert record == StageRecord(**finished) and tree(tmp_path) == before


def test_a_follower_rank_trains_stage_3_without_touching_the_marker(tmp_path):
    config = load_config(None)
    started = {"hash": pipeline.stage_hash(config, "stage3"), "finished": False}
    write_marker(tmp_path / "stage3", started)
    before = tree(tmp_path)
    trained = FinetuneResult(0.5, 0.4, 10, "best.ckpt", "cpu")
    record = pipeline._staged("stage3", config, RunFiles(tmp_path), lambda: trained, 1)
    assert record.finished and record.result == asdict(trained)
    assert tree(tmp_path) == before


def test_a_follower_waits_for_the_marker_of_its_own_config(tmp_path):
    marker = tmp_path / "stage2" / "stage.json"
    write_marker(marker.parent, {"hash": "older", "finished": True})

    def rank_zero():
        time.sleep(0.2)
        write_marker(marker.parent, {"hash": "current", "finished": False})
        time.sleep(0.2)
        write_marker(marker.parent, {"hash": "current", "finished": True})

    writer = threading.Thread(target=rank_zero)
    writer.start()
    started = time.perf_counter()
    record = pipeline._await_marker(RunFiles(tmp_path), "stage2", "current", finished=True, poll_seconds=0.02)
    writer.join()
    assert record == StageRecord("current", True) and time.perf_counter() - started >= 0.4


def relative_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def single_process_errors(config, metrics: dict, checkpoint: Path) -> torch.Tensor:
    """Per-sample test errors of `checkpoint`, evaluated in this one process without Lightning."""
    task = build_task(config.task, config.data_root)
    body = load_source_body(config.source, config.data_root)
    model = build_orca_model(body, task.in_channels, task.head, task.num_outputs, task.output_size, seed=config.seed)
    prepare_model(model, config.stage3, metrics["ranks"], config.seed)
    module = FinetuneModule(model, task, config.stage3, 1, 1, config.seed)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert unexpected == [] and all(key.startswith("model.body.") for key in missing)
    module.eval()
    with torch.no_grad():
        return torch.cat([task.error(module(x), y) for x, y in DataLoader(task.test, batch_size=16)])


@pytest.mark.slow
def test_ddp_run_from_the_cli_writes_one_set_of_outputs_with_the_exact_test_error(tiny_overrides, tmp_path):
    overrides = tiny_overrides + FAST + DDP
    command = [sys.executable, "-m", "orca_lora.cli", "run", str(QUICKSTART)]
    command += [part for item in overrides for part in ("--set", item)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "Starting with 2 processes" in log
    assert log.count("stage3: starting") == 1 and log.count("stage 3 trains on 2 processes") == 1, \
        "only rank 0 logs the pipeline"

    directory = tmp_path / "runs" / "tiny"
    for stage in STAGES:
        assert json.loads((directory / stage / "stage.json").read_text())["finished"], stage
    files = relative_files(directory)
    assert not [f for f in files if Path(f).name.startswith(".") or f.endswith(".tmp")], files
    assert [f for f in files if f.endswith("metrics.json")] == ["metrics.json"]
    assert [f for f in files if "adapter_config.json" in f] == ["stage3/adapter/adapter_config.json"]
    assert sorted(f for f in files if f.startswith("stage3/checkpoints/")) == \
        ["stage3/checkpoints/best.ckpt", "stage3/checkpoints/last.ckpt"]
    metrics = json.loads((directory / "metrics.json").read_text())

    # the same run on one process, from rank 0's stages 1-2: same metric keys, same files
    single = tmp_path / "runs" / "single"
    for stage in ("stage1", "stage2"):
        shutil.copytree(directory / stage, single / stage)
    single_config = load_config(QUICKSTART, tiny_overrides + FAST + ["output.name=single"])
    alone = pipeline.run_pipeline(single_config)
    assert set(metrics) == set(asdict(alone.metrics))
    assert [f for f in files if not f.startswith("plots/")] == relative_files(single), "the CLI adds only plots"

    errors = single_process_errors(single_config, metrics, directory / "stage3" / "checkpoints" / "best.ckpt")
    assert len(errors) == 33
    assert metrics["test_error"] == pytest.approx(float(errors.mean()), abs=1e-6)
    saved = run_files.read_sample_errors(RunFiles(directory)).test
    assert saved == pytest.approx(errors.double().numpy(), abs=1e-6), "rank 0 saves every test sample once"
    padded = float(torch.cat([errors, errors[:1]]).mean())
    assert abs(padded - float(errors.mean())) > 1e-5, "the check could not tell a padded sampler's error apart"
