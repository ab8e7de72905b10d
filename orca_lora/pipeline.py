"""Run stage 1 -> 2 -> 3 for one config into one run directory (DESIGN 3).

Each stage records in `stageN/stage.json` the hash of the config it depends on; a re-run skips a
finished stage whose hash matches and redoes it (and, through the hashes, what follows) otherwise. A run killed during
stage 3 resumes from `stage3/checkpoints/last.ckpt`.

With several training processes (`trainer.strategy: ddp`: Lightning's launcher re-runs the command line
once per extra device; torchrun and srun start every process themselves), every process runs this
function, but only global rank 0 runs stages 1-2 and writes run files; the other ranks wait for its
finished stage markers, train stage 3 with it, and log only warnings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from orca_lora.align import stage as align_stage
from orca_lora.adapters.spec import get_method
from orca_lora.config import Config, run_directory, run_path, section_hash
from orca_lora.data.tasks import build_task
from orca_lora.experiments.plots import plot_run
from orca_lora.files import write_text_atomic
from orca_lora.finetune import stage as finetune_stage
from orca_lora.models.embedder import Embedder
from orca_lora.models.model import build_orca_model
from orca_lora.models.source import load_source_body, source_proxy
from orca_lora.rank import stage as rank_stage

log = logging.getLogger("orca_lora")

STAGE_SECTIONS = {
    "stage1": ("seed", "data_root", "task", "source", "stage1"),
    "stage2": ("seed", "data_root", "task", "source", "stage1", "stage2"),
    "stage3": ("seed", "data_root", "task", "source", "stage1", "stage2", "stage3", "trainer"),
}


@dataclass
class RunResult:
    directory: Path
    metrics: dict[str, Any] | None  # None when the run stopped before stage 3
    global_rank: int = 0  # only rank 0 wrote the run directory and should report it


def stage_hash(config: Config, stage: str) -> str:
    s3 = config.stage3
    digest = section_hash(config, *STAGE_SECTIONS[stage])
    if stage == "stage2":  # ranks also depend on these stage-3 values
        extra = f"{digest}|{s3.rank}|{s3.targets}|{sorted(s3.rank_map.items())}"
        digest = hashlib.sha256(extra.encode()).hexdigest()[:12]
    return digest


def _read_marker(marker: Path) -> dict | None:
    return json.loads(marker.read_text()) if marker.is_file() else None


def _await_marker(marker: Path, expected: str, finished: bool, poll_seconds: float = 1.0) -> dict:
    """Rank 0's marker for the config hash `expected` (finished, if asked). Markers are written
    atomically, so a read never sees half a file. The launcher (torchrun, srun --kill-on-bad-exit)
    ends a waiting rank when rank 0 fails."""
    while True:
        record = _read_marker(marker)
        if record is not None and record["hash"] == expected and (record["finished"] or not finished):
            return record
        time.sleep(poll_seconds)


def _follow(name: str, config: Config, run_dir: Path, work: Callable[[Path], dict]) -> dict:
    """A non-zero rank's stage: rank 0's finished record, or, for stage 3 (which every rank trains),
    its own result once rank 0 has prepared the directory. Writes no marker."""
    record = _await_marker(run_dir / name / "stage.json", stage_hash(config, name), finished=name != "stage3")
    if record["finished"]:
        return record
    started = time.perf_counter()
    result = work(run_dir / name)
    return {"hash": record["hash"], "finished": True, "seconds": time.perf_counter() - started, "result": result}


def _staged(name: str, config: Config, run_dir: Path, work: Callable[[Path], dict], global_rank: int) -> dict:
    """Run `work` into `run_dir/name` unless a finished copy with the same config hash is there.

    `stage.json` records the hash when a stage starts and its result when it finishes; an
    unfinished stage with the same hash keeps its files, so stage 3 resumes from its checkpoint.
    Only global rank 0 writes markers; other ranks follow them.
    """
    if global_rank != 0:
        return _follow(name, config, run_dir, work)
    directory = run_dir / name
    marker = directory / "stage.json"
    expected = stage_hash(config, name)
    record = _read_marker(marker)
    if record is not None and record["hash"] == expected and record["finished"]:
        log.info("%s: finished earlier with the same config (hash %s), skipping", name, expected)
        return record
    if directory.exists() and (record is None or record["hash"] != expected):
        log.info("%s: config changed since the last attempt, starting it afresh", name)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps({"hash": expected, "finished": False}) + "\n")
    log.info("%s: starting (config hash %s)", name, expected)
    started = time.perf_counter()
    result = work(directory)
    record = {"hash": expected, "finished": True, "seconds": time.perf_counter() - started, "result": result}
    write_text_atomic(marker, json.dumps(record, indent=2, default=str) + "\n")
    log.info("%s: finished in %.1f s", name, record["seconds"])
    return record


def run_pipeline(config: Config, last_stage: int = 3) -> RunResult:
    """Stages 1 to `last_stage` for `config`; returns the run directory and its metrics."""
    placement = finetune_stage.process_placement(config.trainer)
    rank = placement.global_rank
    if rank != 0:
        log.setLevel(logging.WARNING)  # one process tells the story, as Lightning's rank_zero_* do
        for name in ("stage1", "stage2"):  # rank 0 also writes the data and source-body caches first
            _await_marker(run_path(config) / name / "stage.json", stage_hash(config, name), finished=True)
    task = build_task(config.task, config.data_root)
    finetune_stage.check_world_size(task, placement.world_size)
    body = load_source_body(config.source, config.data_root)
    if get_method(config.stage3.method).uses_targets:  # a target typo fails here, not after stages 1-2
        rank_stage.adapted_module_shapes(body, config.stage3.targets)
    if config.stage3.rank_map:
        rank_stage.check_rank_map(body, config.stage3.targets, config.stage3.rank_map)
    run_dir = run_directory(config) if rank == 0 else run_path(config)
    source_images, source_labels = source_proxy(config.source, config.data_root)
    embedder = Embedder.from_body(body, task.in_channels, init=config.stage1.embedder_init,
                                  generator=torch.Generator().manual_seed(config.seed))

    def align(directory: Path) -> dict:
        result = align_stage.run(config.stage1, config.trainer, body, task, embedder, source_images,
                                 source_labels, config.seed, directory)
        return asdict(result)

    stage1 = _staged("stage1", config, run_dir, align, rank)
    embedder.load_state_dict(load_file(str(run_dir / "stage1" / "embedder.safetensors")))

    def gap_and_rank(directory: Path) -> dict:
        if not config.stage2.enabled:
            ranks = dict(config.stage3.rank_map) or rank_stage.uniform_ranks(body, config.stage3.targets,
                                                                             config.stage3.rank)
            return {"ranks": ranks, "gaps": None}
        result = rank_stage.run(config.stage2, config.stage1, config.stage3.rank, config.stage3.targets, body,
                                embedder, task, source_images, source_labels, config.seed, directory)
        return asdict(result)

    stage2 = _staged("stage2", config, run_dir, gap_and_rank, rank)
    if last_stage == 2:
        if rank == 0:
            plot_run(run_dir)
        return RunResult(run_dir, None, rank)

    def refine(directory: Path) -> dict:
        model = build_orca_model(body, task.in_channels, task.head, task.num_outputs, task.output_size,
                                 seed=config.seed)
        model.embedder.load_state_dict(embedder.state_dict())
        result = finetune_stage.run(config.stage3, config.trainer, model, stage2["result"]["ranks"], task,
                                    config.seed, directory)
        return asdict(result)

    stage3 = _staged("stage3", config, run_dir, refine, rank)
    metrics = _metrics(config, task.baseline_error, stage1, stage2, stage3)
    if rank == 0:
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        plot_run(run_dir)
    return RunResult(run_dir, metrics, rank)


def _metrics(config: Config, baseline_error: float, stage1: dict, stage2: dict, stage3: dict) -> dict:
    ranks = stage2["result"]["ranks"]
    gaps = stage2["result"].get("gaps")
    return {
        "task": config.task.name,
        "method": config.stage3.method,
        "rank": config.stage3.rank,
        "gap_aware": config.stage2.enabled and config.stage2.allocation == "ibp",
        "seed": config.seed,
        "test_error": stage3["result"]["test_error"],
        "baseline_error": baseline_error,
        "best_val_error": stage3["result"]["best_val_error"],
        "trainable_params": stage3["result"]["trainable_params"],
        "ranks": ranks,
        "mean_gap": sum(gaps) / len(gaps) if gaps else None,
        "alignment": {"distance": config.stage1.distance, "before": stage1["result"]["distance_before"],
                      "after": stage1["result"]["distance_after"]},
        "stage_seconds": {name: record["seconds"] for name, record in
                          (("stage1", stage1), ("stage2", stage2), ("stage3", stage3))},
        "device": stage3["result"]["device"],
        "torch": torch.__version__,
    }
