"""Run stage 1 -> 2 -> 3 for one config into one run directory (README, "Architecture").

Each stage records in `stageN/stage.json` the hash of the config it depends on; a re-run skips a
finished stage whose hash matches and redoes it (and, through the hashes, what follows) otherwise. A run killed during
stage 3 resumes from `stage3/checkpoints/last.ckpt`. Stage 2's marker holds no result: its result is
`stage2/ranks.json`, which stage 3 reads through `run_files.read_ranks`.

With several training processes (`trainer.strategy: ddp`: Lightning's launcher re-runs the command line
once per extra device; torchrun and srun start every process themselves), every process runs this
function, but only global rank 0 runs stages 1-2 and writes run files; the other ranks wait for its
finished stage markers, train stage 3 with it, and log only warnings.

Rank 0 holds the run directory's lock (`run.lock`) for the whole run, so a second launch on the same
directory stops at once, naming the holder. SIGTERM (a scheduler's time limit, preemption) raises
`RunInterrupted`: the stage stays unfinished and the same command resumes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file
from torch.utils.data import Subset

from orca_lora import stage_store
from orca_lora.align import stage as align_stage
from orca_lora.choices import GAP_AWARE_ALLOCATIONS, TRAINING_ALLOCATIONS
from orca_lora.config import Config, run_directory, run_path, section_hash
from orca_lora.data.tasks import SourceSide, build_task
from orca_lora.errors import RunInterrupted
from orca_lora.finetune import stage as finetune_stage
from orca_lora.finetune.allocations import AllocationRequest
from orca_lora.models.embedder import Embedder
from orca_lora.models.features import held_out_split
from orca_lora.models.model import build_orca_model
from orca_lora.models.source import load_source_body, source_proxy
from orca_lora.preflight import check_against_body
from orca_lora.rank import stage as rank_stage
from orca_lora.records import AlignResult, FinetuneResult, GapResult, RunMetrics, StageRecord, from_dict
from orca_lora.run_files import (RunFiles, read_marker, read_marker_or_restart, read_ranks, read_training_ranks,
                                 seconds_spent, write_marker, write_metrics)
from orca_lora.run_lock import RunLock

log = logging.getLogger("orca_lora")

SPECTRAL_NULL_CACHE = "cache/spectral_null"  # under data_root: the spectral gap's data-free null simulations
STAGE_SECTIONS = {
    "stage1": ("seed", "data_root", "task", "source", "stage1"),
    "stage2": ("seed", "data_root", "task", "source", "stage1", "stage2"),
    "stage3": ("seed", "data_root", "task", "source", "stage1", "stage2", "stage3", "trainer"),
}


@dataclass
class RunResult:
    directory: Path
    metrics: RunMetrics | None  # None when the run stopped before stage 3
    process_rank: int = 0  # only global rank 0 wrote the run directory and should report it


def stage_hash(config: Config, stage: str) -> str:
    s3 = config.stage3
    digest = section_hash(config, *STAGE_SECTIONS[stage])
    if stage == "stage1":  # stage 1 aligns on what stage 2 does not hold out
        digest = hashlib.sha256(f"{digest}|{config.stage2.max_samples}".encode()).hexdigest()[:12]
    if stage == "stage2":  # ranks also depend on these stage-3 values
        extra = f"{digest}|{s3.rank}|{s3.targets}|{sorted(s3.rank_map.items())}"
        if s3.block_ranks:  # hashes of runs without it stay as they were
            extra += f"|{sorted(s3.block_ranks.items())}"
        if config.stage2.law is not None:  # a law recalibrated in place changes the ranks
            extra += "|" + hashlib.sha256(Path(config.stage2.law).read_bytes()).hexdigest()
        if config.stage2.posterior_run is not None:  # so does a posterior run finished again in place
            extra += "|" + hashlib.sha256(RunFiles(config.stage2.posterior_run).metrics.read_bytes()).hexdigest()
        digest = hashlib.sha256(extra.encode()).hexdigest()[:12]
    return digest


def measurement_hash(config: Config) -> str:
    """The hash of what stage 2 measures: stage 1's result (its hash) and stage 2's settings but those that
    allocate ranks; no stage-3 field, so every rank and method of a task, data and stage 1 shares it."""
    measuring = {key: value for key, value in asdict(config.stage2).items()
                 if key not in rank_stage.ALLOCATION_FIELDS}
    text = f"{stage_hash(config, 'stage1')}|{json.dumps(measuring, sort_keys=True, default=str)}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _await_marker(run_files: RunFiles, name: str, expected: str, finished: bool,
                  poll_seconds: float = 1.0) -> StageRecord:
    """Rank 0's marker for the config hash `expected` (finished, if asked). Markers are written
    atomically, so a read never sees half a file. The launcher (torchrun, srun --kill-on-bad-exit)
    ends a waiting rank when rank 0 fails."""
    while True:
        record = read_marker(run_files, name)
        if record is not None and record.hash == expected and (record.finished or not finished):
            return record
        time.sleep(poll_seconds)


def _record(result: object | None) -> dict | None:
    """A stage's result as its marker keeps it; None for a stage whose result is a file of its own."""
    return None if result is None else asdict(result)


def _follow(name: str, config: Config, run_files: RunFiles, work: Callable[[], object | None]) -> StageRecord:
    """A non-zero rank's stage: rank 0's finished record, or, for stage 3 (which every rank trains),
    its own result once rank 0 has prepared the directory. Writes no marker."""
    record = _await_marker(run_files, name, stage_hash(config, name), finished=name != "stage3")
    if record.finished:
        return record
    started = time.perf_counter()
    result = work()
    return StageRecord(record.hash, True, time.perf_counter() - started, _record(result))


def _staged(name: str, config: Config, run_files: RunFiles, work: Callable[[], object | None],
            process_rank: int) -> StageRecord:
    """Run `work` (which writes into `run_files.stage(name)`) unless a finished copy with the same
    config hash is there.

    `stage.json` records the hash when a stage starts and its result when it finishes; an
    unfinished stage with the same hash keeps its files, so stage 3 resumes from its checkpoint.
    Only global rank 0 writes markers; other ranks follow them. With `output.shared_stages`, stages 1
    and 2 are first looked up there by their hash, and published there once finished.
    """
    if process_rank != 0:
        return _follow(name, config, run_files, work)
    directory = run_files.stage(name)
    expected = stage_hash(config, name)
    record = read_marker_or_restart(run_files, name)
    if record is not None and record.hash == expected and record.finished:
        log.info("%s: finished earlier with the same config (hash %s), skipping", name, expected)
        return record
    store = config.output.shared_stages
    if store is not None and name in stage_store.SHARED_STAGES and stage_store.fetch(Path(store), name, expected,
                                                                                    directory):
        return read_marker(run_files, name)
    earlier = 0.0
    if directory.exists() and (record is None or record.hash != expected):
        log.info("%s: config changed since the last attempt, starting it afresh", name)
        shutil.rmtree(directory)
    elif record is not None:  # an unfinished attempt with this config: it continues, its time counts
        earlier = seconds_spent(run_files, name, record)
    directory.mkdir(parents=True, exist_ok=True)
    write_marker(run_files, name, StageRecord(expected, started=time.time(), earlier_seconds=earlier))
    log.info("%s: starting (config hash %s)", name, expected)
    started = time.perf_counter()
    try:
        result = work()
    except RunInterrupted as interrupted:
        raise interrupted.during(name) from None
    record = StageRecord(expected, True, earlier + time.perf_counter() - started, _record(result),
                         earlier_seconds=earlier)
    write_marker(run_files, name, record)
    log.info("%s: finished in %.1f s", name, record.seconds)
    if store is not None and name in stage_store.SHARED_STAGES:
        stage_store.publish(Path(store), name, expected, directory)
    return record


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `RunInterrupted` in the main thread while the run lasts (Lightning calls this
    handler after its own during stage 3, and its own alone would end the process with status 0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:
        raise RunInterrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_pipeline(config: Config, last_stage: int = 3) -> RunResult:
    """Stages 1 to `last_stage` for `config`; returns the run directory and its metrics."""
    placement = finetune_stage.process_placement(config.trainer)
    with contextlib.ExitStack() as held, _sigterm_raises():
        return _run_stages(config, last_stage, placement, RunFiles(run_path(config)), held)


def _run_stages(config: Config, last_stage: int, placement: finetune_stage.ProcessPlacement,
                run_files: RunFiles, held: contextlib.ExitStack) -> RunResult:
    process_rank = placement.global_rank
    if process_rank != 0:
        log.setLevel(logging.WARNING)  # one process tells the story, as Lightning's rank_zero_* do
        for name in ("stage1", "stage2"):  # rank 0 also writes the data and source-body caches first
            _await_marker(run_files, name, stage_hash(config, name), finished=True)
    body = load_source_body(config.source, config.data_root)
    task = build_task(config.task, config.data_root, SourceSide(config.source, body))
    finetune_stage.check_world_size(task, placement.world_size)
    s3 = config.stage3
    check_against_body(config, body, in_channels=task.in_channels)  # a typo or impossible rank fails here
    source_images, source_labels = source_proxy(config.source, config.data_root)
    held_out = config.stage2.max_samples
    source_split = held_out_split(len(source_images), held_out, config.source.pretrain.seed, "the source proxy set")
    target_split = held_out_split(len(task.train), held_out, config.task.data_seed, "the target's training split")
    if process_rank == 0:  # it owns the directory; the other ranks of its launch join it without a lock
        held.enter_context(RunLock(run_files))  # after the checks above: a refused config leaves no directory
        run_directory(config)
    embedder = Embedder.from_body(body, task.in_channels, init=config.stage1.embedder_init,
                                  generator=torch.Generator().manual_seed(config.seed))

    def align() -> AlignResult:
        aligned_on = replace(task, train=Subset(task.train, target_split.align.tolist()))
        return align_stage.run(config.stage1, config.trainer, body, aligned_on, embedder,
                               source_images[source_split.align], source_labels[source_split.align], config.seed,
                               run_files)

    stage1 = _staged("stage1", config, run_files, align, process_rank)
    embedder.load_state_dict(load_file(str(run_files.embedder)))

    def gap_and_rank() -> None:  # writes ranks.json, stage 2's one result file; the marker keeps none
        if not config.stage2.enabled:
            rank_stage.explicit_ranks(body, s3.targets, s3.rank, s3.rank_map, run_files, s3.block_ranks)
            return
        measured_on = replace(task, train=Subset(task.train, target_split.gap.tolist()))
        inputs = rank_stage.GapInputs(body, embedder, measured_on, source_images[source_split.gap],
                                      source_labels[source_split.gap], s3.targets, s3.rank, config.seed,
                                      measure_seed=config.task.data_seed,
                                      calibrations=Path(config.data_root) / SPECTRAL_NULL_CACHE,
                                      block_ranks=s3.block_ranks)
        store = None if config.output.shared_stages is None else Path(config.output.shared_stages)
        record = stage_store.measured_once(store, measurement_hash(config), lambda: rank_stage.measured_record(
            rank_stage.measure_gaps(config.stage2, inputs)))
        rank_stage.run(config.stage2, inputs, run_files, rank_stage.measured_from_record(record))

    stage2 = _staged("stage2", config, run_files, gap_and_rank, process_rank)
    gaps = read_ranks(run_files)
    if last_stage == 2:
        return RunResult(run_files.root, None, process_rank)

    def refine() -> FinetuneResult:
        model = build_orca_model(body, task.in_channels, task.head, task.num_outputs, task.output_size,
                                 seed=config.seed)
        model.embedder.load_state_dict(embedder.state_dict())
        return finetune_stage.run(s3, config.trainer, model, gaps.ranks, task, config.seed, run_files,
                                  prior_masses=gaps.prior_masses, allocation=training_allocation(config, gaps))

    stage3 = _staged("stage3", config, run_files, refine, process_rank)
    metrics = _metrics(config, task.baseline_error, stage1, stage2, gaps, stage3, run_files)
    if process_rank == 0:
        write_metrics(run_files, metrics)
    return RunResult(run_files.root, metrics, process_rank)


def training_allocation(config: Config, gaps: GapResult) -> AllocationRequest | None:
    """Stage 2's hand-over to a stage-3 allocation: its name, the budget its ranks.json holds (the
    uniform stage3.rank ranks' cost when it holds none), and stage 2's rank bounds; None otherwise."""
    if gaps.allocation not in TRAINING_ALLOCATIONS:
        return None
    budget = gaps.budget if gaps.budget is not None else gaps.trainable_params
    return AllocationRequest(gaps.allocation, budget, config.stage2.r_min, config.stage2.r_max)


def _metrics(config: Config, baseline_error: float, stage1: StageRecord, stage2: StageRecord, gaps: GapResult,
             stage3: StageRecord, run_files: RunFiles) -> RunMetrics:
    """metrics.json's record: stage 2's `gaps` as `ranks.json` holds them, stage 1 and 3's results from
    their markers."""
    alignment = from_dict(AlignResult, stage1.result, run_files.marker("stage1"))
    # a stage-3 allocation's ranks are the tested model's, in stage3/ranks.json
    ranks = read_training_ranks(run_files).ranks if gaps.allocation in TRAINING_ALLOCATIONS else gaps.ranks
    refined = from_dict(FinetuneResult, stage3.result, run_files.marker("stage3"))
    corrected = gaps.corrected_gaps
    return RunMetrics(
        task=config.task.name,
        method=config.stage3.method,
        rank=config.stage3.rank,
        gap_aware=config.stage2.enabled and config.stage2.allocation in GAP_AWARE_ALLOCATIONS,
        seed=config.seed,
        test_error=refined.test_error,
        baseline_error=baseline_error,
        best_val_error=refined.best_val_error,
        unpruned_val_error=refined.unpruned_val_error,
        trainable_params=refined.trainable_params,
        ranks=ranks,
        mean_gap=sum(corrected) / len(corrected) if corrected else None,
        alignment={"distance": config.stage1.distance, "before": alignment.distance_before,
                   "after": alignment.distance_after},
        stage_seconds={"stage1": stage1.seconds, "stage2": stage2.seconds, "stage3": stage3.seconds},
        device=refined.device,
        torch=torch.__version__,
        allocation=gaps.allocation,
        trained_params=refined.trained_params,
        posterior_ranks=refined.posterior_ranks,
        posterior_caps=refined.posterior_caps,
    )
