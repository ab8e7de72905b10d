"""The run directory's contract (README, "Run directory"): every path of a run directory, and the one writer and
the one reader of each file (the typed records they hold are in records.py). Stages, the pipeline, the experiments and the
tests all go through this module, so a renamed file or column changes here and nowhere else.

    runs/<name>/
      run.lock                         while a run owns the directory: pid, host, start time (run_lock.py)
      config.yaml                      the resolved config
      stage1/stage.json                marker: config hash, finished, seconds, result (AlignResult)
      stage1/embedder.safetensors      the aligned embedder
      stage1/alignment.csv             epoch, distance (epoch 0 = before training)
      stage2/stage.json                marker only (result null: stage 2's result is ranks.json)
      stage2/gaps.csv                  GAP_COLUMNS: block, name, width, gap, floor, p_value, interval, corrected, rank
                                       (0 in a block with no adapted module)
      stage2/ranks.json                stage 2's result, the one file of its ranks: module -> rank, gaps, alpha0,
                                       budget, allocation, prior masses (GapResult)
      stage3/stage.json                marker, result (FinetuneResult)
      stage3/ranks.json                a stage-3 allocation's ranks of the model tested (GapResult, no gaps; wins over stage 2's)
      stage3/checkpoints/              Lightning's best.ckpt and last.ckpt (trainable weights only)
      stage3/last.ckpt.corrupt-<time>  a last.ckpt that did not load, set aside (stage 3 restarted)
      stage3/logs/version_0/metrics.csv
      stage3/trainable.safetensors     what training changed
      stage3/sample_errors.npz         per-sample validation and test errors of the best checkpoint
      stage3/adapter/                  PEFT format, for methods that have one
      stage3/merged.safetensors        on request (stage3.save_merged)
      metrics.json                     RunMetrics
      failed.txt                       a sweep point's one-line reason for failing (sweep_files.py; gone once it finishes)
      run.log                          a sweep point's output, one block per attempt (sweeps/workers.py)
      plots/

    <sweep>/sweep.json                 a sweep's plan (sweeps/sweep.py writes it): its points, each a run directory
                                       <sweep>/<point>/ (sweep_files.py: PlannedPoint, read_sweep_plans)

Reading needs no torch: experiments and the CLI read runs without the training stack.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from orca_lora.files import save_npz_atomic, write_json_atomic, write_text_atomic
from orca_lora.records import GapResult, GapRow, RunMetrics, SampleErrors, StageRecord, from_dict

log = logging.getLogger("orca_lora")

STAGES = ("stage1", "stage2", "stage3")
METRICS_FILE = "metrics.json"  # its presence marks a finished run
GAP_COLUMNS = ("block", "name", "width", "gap", "floor", "p_value", "ci_low", "ci_high", "corrected", "rank")

@dataclass(frozen=True)
class RunFiles:
    """The paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
        return self.root / name

    def marker(self, name: str) -> Path:
        return self.stage(name) / "stage.json"

    @property
    def embedder(self) -> Path:
        return self.root / "stage1" / "embedder.safetensors"

    @property
    def alignment(self) -> Path:
        return self.root / "stage1" / "alignment.csv"

    @property
    def gaps(self) -> Path:
        return self.root / "stage2" / "gaps.csv"

    @property
    def ranks(self) -> Path:
        return self.root / "stage2" / "ranks.json"

    @property
    def training_ranks(self) -> Path:
        """A stage-3 allocation's ranks (gradient, eva, adalora), beside stage 2's untouched ones."""
        return self.root / "stage3" / "ranks.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "stage3" / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def training_log(self) -> Path:
        return self.root / "stage3" / "logs" / "version_0" / "metrics.csv"

    @property
    def trainable(self) -> Path:
        return self.root / "stage3" / "trainable.safetensors"

    @property
    def sample_errors(self) -> Path:
        return self.root / "stage3" / "sample_errors.npz"

    @property
    def adapter(self) -> Path:
        return self.root / "stage3" / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "stage3" / "merged.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def is_finished(self) -> bool:
        return self.metrics.is_file()


def _write_json(path: Path, payload: Any) -> None:
    write_json_atomic(path, payload)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the run has not written it yet (finish the run with "
                                "`orca-lora run` on its config)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it and re-run the stage that writes it") \
            from None


def write_marker(run: RunFiles, name: str, record: StageRecord) -> None:
    _write_json(run.marker(name), asdict(record))


def read_marker(run: RunFiles, name: str) -> StageRecord | None:
    """The stage's marker, or None when the stage never started."""
    path = run.marker(name)
    return from_dict(StageRecord, read_json(path), path) if path.is_file() else None


def read_marker_or_restart(run: RunFiles, name: str) -> StageRecord | None:
    """As `read_marker`, but a marker that does not parse counts as "never started", with a warning
    naming it: the pipeline then redoes the stage instead of failing on every re-run."""
    try:
        return read_marker(run, name)
    except ValueError as error:
        log.warning("%s; redoing %s", error, name)
        return None


def seconds_spent(run: RunFiles, name: str, record: StageRecord) -> float:
    """Seconds of a stage's attempts so far: the earlier ones, plus the latest from its start to the last
    file it wrote (a killed attempt writes nothing at its end)."""
    if record.started is None:
        return record.earlier_seconds
    written = [path.stat().st_mtime for path in run.stage(name).rglob("*") if path.is_file()]
    return record.earlier_seconds + max(0.0, max(written, default=record.started) - record.started)


def write_alignment(run: RunFiles, distance: str, curve: Sequence[float]) -> None:
    rows = "".join(f"{epoch},{value:.6g}\n" for epoch, value in enumerate(curve))
    write_text_atomic(run.alignment, f"epoch,{distance}\n{rows}")


def read_alignment(run: RunFiles) -> tuple[str, list[float]]:
    """(distance name, curve) from `alignment.csv`."""
    rows = read_csv(run.alignment)
    distance = [key for key in rows[0] if key != "epoch"][0]
    return distance, [float(row[distance]) for row in rows]


def write_gaps(run: RunFiles, rows: Sequence[GapRow]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(GAP_COLUMNS)
    writer.writerows((row.block, row.name, row.width, *(f"{value:.6g}" for value in (
        row.gap, row.floor, row.p_value, row.ci_low, row.ci_high, row.corrected)), row.rank) for row in rows)
    write_text_atomic(run.gaps, buffer.getvalue())


def read_gaps(run: RunFiles) -> list[GapRow] | None:
    """Per-block gaps and ranks, or None when stage 2 measured no gap."""
    if not run.gaps.is_file():
        return None
    rows = read_csv(run.gaps)
    missing = [column for column in GAP_COLUMNS if column not in rows[0]]
    if missing:
        raise ValueError(f"{run.gaps}: no column(s) {missing}; it was written by an older version, so re-run "
                         "stage 2 (delete the run's stage2/ folder and run the same command)")
    return [GapRow(int(row["block"]), row["name"], int(row["width"]), float(row["gap"]), float(row["floor"]),
                   float(row["p_value"]), float(row["ci_low"]), float(row["ci_high"]), float(row["corrected"]),
                   int(row["rank"])) for row in rows]


def write_ranks(run: RunFiles, result: GapResult) -> None:
    _write_json(run.ranks, asdict(result))


def read_ranks(run: RunFiles) -> GapResult:
    """Stage 2's ranks, the one reader of `ranks.json` (the pipeline hands them to stage 3 from here)."""
    if not run.ranks.is_file():
        raise FileNotFoundError(f"{run.ranks} not found; stage 2 writes it: finish the run (`orca-lora run` on its "
                                "config), or, if its stage 2 finished without it, re-run stage 2 (delete the "
                                "run's stage2/ folder and run the same command)")
    return from_dict(GapResult, read_json(run.ranks), run.ranks)


def write_training_ranks(run: RunFiles, result: GapResult) -> None:
    _write_json(run.training_ranks, asdict(result))


def read_training_ranks(run: RunFiles) -> GapResult:
    return from_dict(GapResult, read_json(run.training_ranks), run.training_ranks)


def read_effective_ranks(run: RunFiles) -> GapResult:
    """The ranks the run trained with: `stage3/ranks.json` when an allocation chose them in stage 3's
    setup (it sees the model), else stage 2's `ranks.json`."""
    return read_training_ranks(run) if run.training_ranks.is_file() else read_ranks(run)


def write_metrics(run: RunFiles, metrics: RunMetrics) -> None:
    _write_json(run.metrics, asdict(metrics))


def read_metrics(run: RunFiles) -> RunMetrics:
    return from_dict(RunMetrics, read_json(run.metrics), run.metrics)


def write_sample_errors(run: RunFiles, errors: SampleErrors) -> None:
    save_npz_atomic(run.sample_errors, val=errors.val, test=errors.test)


def read_sample_errors(run: RunFiles) -> SampleErrors:
    import numpy as np

    if not run.sample_errors.is_file():
        raise FileNotFoundError(f"{run.sample_errors} not found; runs written before per-sample errors were saved "
                                "need stage 3 re-run for a paired comparison")
    with np.load(run.sample_errors) as stored:
        return SampleErrors(val=stored["val"], test=stored["test"])


def read_training_log(run: RunFiles) -> list[dict[str, str]]:
    return read_csv(run.training_log) if run.training_log.is_file() else []


def training_log_before(run: RunFiles, step: int) -> list[dict[str, str]]:
    """The training log's rows logged before global step `step`, without their empty cells: what a
    run resumed from a checkpoint of that step keeps (it logs the later rows again)."""
    if not run.training_log.is_file():
        return []
    with open(run.training_log, newline="") as stream:
        return [{key: value for key, value in row.items() if value != ""} for row in csv.DictReader(stream)
                if int(row["step"]) < step]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{path}: no rows; delete it and re-run the stage that writes it")
    return rows


def stage_results(run: RunFiles) -> dict[str, StageRecord]:
    """Every stage marker that exists, by stage name."""
    found = {name: read_marker(run, name) for name in STAGES}
    return {name: record for name, record in found.items() if record is not None}


NOT_COMPARED = ("output.", "data_root")  # where a run's files live, not what it computed


@dataclass(frozen=True)
class FinishedRun:
    """A finished run as the analyses read it: its files, metrics.json and its saved config.yaml."""
    files: RunFiles
    metrics: RunMetrics
    config: dict[str, Any]  # config.yaml as plain dicts and lists
    task: str  # task.name, plus the task.* settings that tell it apart from another task of that name

    @property
    def settings(self) -> dict[str, Any]:
        """The flattened config (`stage3.rank`: 8), without the keys that say where its files live."""
        return {key: value for key, value in flatten(self.config).items() if not key.startswith(NOT_COMPARED)}


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Every finished run directory (one holding metrics.json) at or below the given paths."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory; give run or sweep directories")
        found += [metrics.parent for metrics in sorted(path.rglob(METRICS_FILE))]
    if not found:
        raise FileNotFoundError(f"no finished run (metrics.json) under {', '.join(map(str, paths))}; "
                                "run the sweep first (orca-lora sweep SWEEP.yaml)")
    return found


def diverged(metrics: RunMetrics) -> bool:
    """Non-finite errors: written by versions that let a diverged run finish."""
    return not (math.isfinite(metrics.test_error) and math.isfinite(metrics.best_val_error))


def read_finished_runs(paths: Sequence[str | Path], method: str | None = None) -> list[FinishedRun]:
    """Every finished run at or below `paths` (of stage-3 `method` only, when given), the one reader the
    analyses share. Runs with non-finite errors are left out, each named in a warning; a run without
    its config.yaml is an error."""
    loaded, n_diverged = [], 0
    for directory in find_runs(paths):
        run = RunFiles(directory)
        metrics = read_metrics(run)
        if method is not None and metrics.method != method:
            log.info("%s: method %s, not %s: left out", run.root, metrics.method, method)
            continue
        if not run.config.is_file():
            raise FileNotFoundError(f"{run.config} is missing; every run directory keeps its resolved config")
        if diverged(metrics):
            log.warning("%s: test error %s, best validation error %s: the run diverged; left out (re-run it with "
                        "a lower stage3.lr)", run.metrics, metrics.test_error, metrics.best_val_error)
            n_diverged += 1
            continue
        loaded.append((run, metrics, _read_yaml(run.config)))
    if not loaded:
        kind, where = f"{method} run" if method else "run", ", ".join(map(str, paths))
        found = f"every {kind} under {where} ({n_diverged}) diverged" if n_diverged else f"no {kind} under {where}"
        raise ValueError(f"{found}; nothing to tabulate or analyse")
    labels = task_labels([config["task"] for _, _, config in loaded])
    return [FinishedRun(run, metrics, config, label) for (run, metrics, config), label in zip(loaded, labels)]


def task_labels(tasks: Sequence[dict]) -> list[str]:
    """Each task's name, plus `(key=value,...)` for the task.* settings in which tasks of that name differ."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for task in tasks:
        by_name[task["name"]].append(task)
    differing = {name: sorted(key for key in group[0] if len({json.dumps(t[key]) for t in group}) > 1)
                 for name, group in by_name.items()}
    return [task["name"] + ("(" + ",".join(f"{k}={task[k]}" for k in differing[task["name"]]) + ")"
                            if differing[task["name"]] else "") for task in tasks]


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path))


EMBEDDER_PROJECTION = "embedder.proj"  # the target embedder's patchify conv, as ranks.json names it


def module_block(module: str, block_names: Sequence[str]) -> int | None:
    """The index of the block (a gaps.csv name, e.g. `layers.1.blocks.0`) that holds `module` (e.g.
    `body.layers.1.blocks.0.attn.qkv`): the block whose dotted name stands in the module's as whole
    components; the embedder's projection is block 0's, whose input it makes. The one rule for it:
    ranks.json, metrics.json and gaps.csv name modules and blocks so."""
    if module == EMBEDDER_PROJECTION and block_names:
        return 0
    for index, name in enumerate(block_names):
        if f".{name}." in f".{module}.":
            return index
    return None
