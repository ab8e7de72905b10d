"""The typed records a run directory holds (README, "Run directory"; run_files.py writes and reads them):
each stage's marker and result, the run's metrics, a row of gaps.csv, the per-sample errors, and `from_dict`,
which builds any of them from the JSON a file holds. Plain dataclasses: reading a run needs no torch."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, TypeVar

Record = TypeVar("Record")


def from_dict(cls: type[Record], data: dict[str, Any], source: Path | str = "run file") -> Record:
    """`cls(**data)` for a record dataclass; fields missing from older files take their defaults, and a
    null in a `float` field is NaN (the files are strict JSON: `files.strict_json_text` writes NaN as null)."""
    known = {f.name for f in fields(cls)}
    numbers = {f.name for f in fields(cls) if f.type == "float"}
    values = {key: math.nan if value is None and key in numbers else value for key, value in data.items()
              if key in known}
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"{source}: does not hold a {cls.__name__} ({error}); re-run the stage that writes it") \
            from None


@dataclass
class StageRecord:
    """`stageN/stage.json`: the config hash a stage ran with, and its result once finished."""

    hash: str
    finished: bool = False
    seconds: Optional[float] = None  # once finished: every attempt's seconds together
    result: Optional[dict[str, Any]] = None
    started: Optional[float] = None  # Unix time the latest attempt started
    earlier_seconds: float = 0.0  # attempts before the latest, each up to its last file written


@dataclass
class AlignResult:
    """Stage 1's result."""

    curve: list[float]  # distance over the alignment set: entry 0 before training, then one per epoch
    distance_before: float
    distance_after: float


@dataclass
class GapResult:
    """Stage 2's result: the content of `ranks.json`, the one file that holds stage 2's ranks (its
    `stage.json` is the marker alone).

    For a stage-3 allocation (choices.TRAINING_ALLOCATIONS: it needs the training model) stage 2 still
    measures the gaps, and `ranks` holds the uniform stage3.rank, `allocation` the stage-3 allocation's
    name and `budget` the adapter parameters its ranks must meet; stage 3 replaces the ranks."""

    blocks: list[str]  # Swin block names, forward order; empty when stage 2 was off
    gaps: Optional[list[float]]  # D_i per block as measured; None when stage 2 was off
    ranks: dict[str, int]  # OrcaModel module name -> LoRA rank
    alpha0: Optional[float]  # None for uniform ranks
    trainable_params: int  # adapter parameters sum r_i (d_in + d_out)
    budget: Optional[int]
    allocation: str = "gap-relative"  # a stage2.allocation, or "explicit" (stage3.rank_map / stage 2 off)
    corrected_gaps: Optional[list[float]] = None  # max(D_i - floor_i, 0), 0 where p >= 0.05: what ranks use
    prior_masses: Optional[dict[str, float]] = None  # module -> its block's IBP mass alpha_i (not for uniform)


@dataclass
class FinetuneResult:
    """Stage 3's result."""

    test_error: float
    best_val_error: float  # of the model tested, at the checkpoint chosen on validation (ibp-lora: pruned)
    trainable_params: int  # of the model tested: for ibp-lora the pruned adapters' sum r_i (d_in + d_out) + the rest
    best_checkpoint: str
    device: str
    trained_params: Optional[int] = None  # of the model that trained (ibp-lora: r_max components, gates, sticks)
    posterior_ranks: Optional[dict[str, int]] = None  # ibp-lora: module -> components with q(z = 1) > 0.5
    posterior_caps: Optional[dict[str, int]] = None  # ibp-lora: module -> its truncation r_max (right-censoring)
    unpruned_val_error: Optional[float] = None  # ibp-lora: that checkpoint's before pruning, which chose it


@dataclass
class RunMetrics:
    """`metrics.json`: what a finished run reports; the experiments read runs through this."""

    task: str
    method: str
    rank: int
    gap_aware: bool
    seed: int
    test_error: float
    baseline_error: float
    best_val_error: float  # of the model tested, at the checkpoint chosen on validation
    trainable_params: int
    ranks: dict[str, int]
    mean_gap: Optional[float]  # mean over blocks of the floor-corrected gap
    alignment: dict[str, Any]
    stage_seconds: dict[str, float]
    device: str
    torch: str
    allocation: Optional[str] = None  # None in runs written before it was recorded
    trained_params: Optional[int] = None  # parameters that trained; trainable_params counts the model tested
    posterior_ranks: Optional[dict[str, int]] = None  # ibp-lora: module -> posterior rank (pruned to it)
    posterior_caps: Optional[dict[str, int]] = None  # ibp-lora: module -> truncation r_max of its posterior rank
    # ibp-lora: the validation error before pruning, which chose the checkpoint; best_val_error, like
    # test_error and sample_errors.npz, is the pruned model's (runs written before it: the unpruned one)
    unpruned_val_error: Optional[float] = None


@dataclass
class GapRow:
    """One block of `gaps.csv`: its gap as measured, against its null, and the rank it got."""

    block: int
    name: str
    width: int  # the block's feature dimension
    gap: float  # D_i as measured (a negative MMD^2_u is kept)
    floor: float  # the null's 95% quantile at the same sample sizes
    p_value: float
    ci_low: float  # 95% interval of D_i
    ci_high: float
    corrected: float  # max(D_i - floor, 0), 0 where p >= 0.05
    rank: int  # 0 when no adapted module sits in the block


@dataclass
class SampleErrors:
    """Per-sample errors of the best checkpoint, in dataset order, for paired comparisons."""

    val: Any  # numpy float64 (n_val,)
    test: Any  # numpy float64 (n_test,)
