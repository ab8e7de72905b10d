"""Typed configuration: one YAML file per experiment, validated into dataclasses.

Structure and type checks (unknown keys, wrong types) come from OmegaConf structured configs;
choices and ranges are checked by `validate`, which names the key, the bad value and the valid
choices. Every check runs before any expensive work.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orca_lora import choices
from orca_lora.choices import (  # noqa: F401  (re-exported: the config's choice lists)
    ALIGN_DISTANCES,
    EMBEDDER_INITS,
    GAP_DISTANCES,
    METHODS,
    OTDD_INNER,
    BUDGETED_ALLOCATIONS,
    RANK_ALLOCATIONS,
    RANK_DECISIONS,
    RANK_LINKS,
    SCHEDULES,
    SOURCE_PROXIES,
    TASKS,
    TRAINING_ALLOCATIONS,
)
from orca_lora.files import write_text_atomic

DEFAULT_TARGETS = (r"\.attn\.qkv$", r"\.attn\.proj$", r"\.mlp\.fc1$", r"\.mlp\.fc2$")


class ConfigError(ValueError):
    """A configuration problem, with the dotted key and the fix in the message."""


@dataclass
class TaskConfig:
    name: str = "darcy"
    file: Optional[str] = None  # darcy: .mat / .hdf5 / .pt file; None generates the data
    test_file: Optional[str] = None  # darcy: separate test file (FNO ships train and test files)
    resolution: int = 32  # generated tasks: side of the grid / image (digits are resized to it)
    downsample: int = 1  # darcy files: keep every r-th point (5 turns 421 into 85)
    n_train: Optional[int] = 1000  # null: every training sample of a file / dataset
    n_test: Optional[int] = 200  # null: every test sample of a file / dataset
    val_fraction: float = 0.1  # carved from the training split for model selection
    data_seed: int = 0  # generated data (Darcy, procedural classes and images): fixed apart from `seed`
    n_classes: int = 10  # procedural targets
    class_offset: int = 100  # procedural targets: class ids unseen by the source body
    download: bool = False  # cifar: fetch with torchvision when missing
    noise: float = 0.3  # procedural-noise: std of the additive Gaussian noise, in [0, 1]
    permute_fraction: float = 1.0  # procedural-permuted: fraction of the tiles moved, in [0, 1]
    tile: int = 1  # procedural-permuted: tile side in pixels (1: pixels), divides task.resolution
    wavenumber: float = 3.0  # helmholtz: k in [1, 4] (k^2 below the first Dirichlet eigenvalue 2 pi^2)
    time: float = 0.002  # heat: final time T > 0 (0.002 keeps modes up to |k| ~ 8 above 1/10)


@dataclass
class PretrainConfig:
    model: str = "swin_tiny_patch4_window7_224"  # timm family; the sizes below override it
    img_size: int = 32
    patch_size: int = 2
    window_size: int = 4
    embed_dim: int = 48
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12])
    n_classes: int = 16
    samples_per_class: int = 200
    val_fraction: float = 0.1
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0  # the offline body is a fixed artifact, shared by runs with different `seed`


@dataclass
class SourceConfig:
    model: str = "offline"  # a timm Swin name, or "offline" for the procedural-pretrained body
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # timm hub weights (needs internet)
    checkpoint: Optional[str] = None  # local weights for `model`
    proxy: str = "procedural"  # source proxy set for alignment and gaps
    proxy_samples: int = 1000
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class Stage1Config:
    epochs: int = 10  # 0 skips alignment (the seed's "embedder training: disable")
    distance: str = "otdd"
    otdd_inner: str = "exact"
    entropic_reg: float = 0.1
    sinkhorn_tolerance: float = 1e-3  # outer Sinkhorn: L1 marginal error to stop at (align/sinkhorn.py)
    sinkhorn_max_iters: int = 1000  # outer Sinkhorn: iteration cap, warns when hit
    max_samples: int = 512  # target samples used for alignment
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    n_pseudo_labels: int = 10  # k-means clusters labelling regression targets
    embedder_init: str = "source"


@dataclass
class Stage2Config:
    enabled: bool = True  # false: no gaps measured, every adapted module gets stage3.rank
    # gap-relative: IBP mass alpha_0 g(D_i / mean D); gap: alpha_0 g(D_i / gap_reference) (absolute);
    # flat: alpha_0 in every block; uniform: gaps measured, stage3.rank everywhere; the rest of
    # choices.RANK_ALLOCATIONS: orca_lora/rank/allocations/ (one module each)
    allocation: str = "gap-relative"
    gap_reference: Optional[float] = None  # allocation gap / shuffled: D_ref; None: each block's noise floor
    law: Optional[str] = None  # allocation law: a rank_law.json from `orca-lora calibrate`
    posterior_run: Optional[str] = None  # allocation ibp-posterior: a finished ibp-lora run's directory
    distance: str = "mmd"
    otdd_inner: str = "exact"  # distance otdd: label-to-label cost, as stage1.otdd_inner
    entropic_reg: float = 0.1  # distance otdd: outer entropic regularisation
    sinkhorn_tolerance: float = 1e-3  # distance otdd: as stage1.sinkhorn_tolerance
    sinkhorn_max_iters: int = 1000  # distance otdd: as stage1.sinkhorn_max_iters
    n_pseudo_labels: int = 10  # k-means clusters labelling regression targets (otdd)
    max_samples: int = 256  # source and target samples held out from stage 1 for the gap (each side)
    permutations: int = 200  # null draws for the floor and p-value of mmd and the resampled distances
    bootstraps: int = 200  # draws for the gap's 95% interval
    link: str = "linear"
    decision: str = "mean"
    quantile: float = 0.5
    r_min: int = 1
    r_max: int = 64
    alpha0: Optional[float] = None  # None: stage3.rank, unless a budget is set
    budget: Optional[int] = None  # trainable adapter parameters to meet by fitting alpha0
    match_uniform_budget: bool = False  # budget = what a uniform stage3.rank costs (allocation experiments)


@dataclass
class Stage3Config:
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank_map: dict[str, int] = field(default_factory=dict)  # explicit {module: rank}; needs stage2.enabled false
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    step_size: int = 30  # step schedule: epochs between decays
    gamma: float = 0.1  # step schedule: decay factor
    grad_clip: float = 1.0  # 0 disables clipping
    loraplus_ratio: float = 16.0
    delta_start_step: int = 100
    delta_update_ratio: float = 0.5
    dylora_min_rank: int = 1
    dylora_frozen: bool = False
    ibp_temperature: float = 2.0 / 3.0  # ibp-lora: the relaxed Bernoulli gates' temperature
    ibp_r_max: Optional[int] = None  # ibp-lora: components per module (capped at min(d_out, d_in)); None: stage2.r_max
    early_stopping_patience: int = 0  # 0 disables early stopping
    save_merged: bool = False
    # stage-3 allocations (stage2.allocation gradient, eva, adalora; finetune/allocations/)
    allocation_batches: int = 8  # gradient, eva: training batches the allocation reads before training
    eva_rho: float = 2.0  # eva: EVA's components per module, rho x its rank (PEFT EvaConfig.rho)
    eva_tau: float = 0.99  # eva: EVA's convergence threshold on the components' cosine similarity (EvaConfig.tau)
    adalora_init_ratio: float = 1.5  # adalora: init_r = ceil(ratio x target_r) (the AdaLoRA paper's 1.5)
    adalora_tinit: float = 0.1  # adalora: warm-up before pruning starts, a fraction of the training steps
    adalora_tfinal: float = 0.2  # adalora: final fine-tuning at the target budget, a fraction of the steps
    adalora_delta_t: int = 1  # adalora: steps between two budget allocations (PEFT deltaT)
    adalora_beta1: float = 0.85  # adalora: EMA of the sensitivity (PEFT beta1)
    adalora_beta2: float = 0.85  # adalora: EMA of its uncertainty (PEFT beta2)
    adalora_orth_reg_weight: float = 0.5  # adalora: weight of the orthogonality penalty on P and Q


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 10
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    num_workers: int = 0


@dataclass
class OutputConfig:
    root: str = "runs"
    name: Optional[str] = None  # None: the config file's stem


@dataclass
class Config:
    seed: int = 0
    data_root: str = "data"
    task: TaskConfig = field(default_factory=TaskConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), allow_empty: bool = False) -> Config:
    """Read a YAML file (or the defaults) plus `a.b=c` overrides into a validated `Config`.

    A file with no sections is refused unless `allow_empty` (the CLI's --defaults): an empty file
    would otherwise run the whole default pipeline without a word."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    where = "defaults" if path is None else str(path)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append(_load_yaml(path, allow_empty))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stage3.rank=8)")
    if overrides:
        where += " with --set " + " ".join(overrides)
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_describe(error)}") from None
    if config.output.name is None and path is not None:
        config.output.name = path.stem
    validate(config)
    return config


SECTIONS = tuple(Config.__dataclass_fields__)


def _load_yaml(path: Path, allow_empty: bool = False):
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml's scanner errors have no common base worth naming
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if not loaded and not allow_empty:
        raise ConfigError(f"{path}: the config is empty; a config sets some of the sections "
                          f"{', '.join(SECTIONS)} (task.name at least; see configs/quickstart.yaml), "
                          "or pass --defaults to run every default")
    return loaded


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    if "not in" in message and key:
        return f"unknown key '{key}' ({message}); see the sections of orca_lora/config.py"
    return f"key '{key}': {message}" if key else message


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: {value} must be >= {low}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}: {value} must be in [{low}, {high}]")


def _sinkhorn(section: str, tolerance: float, max_iters: int) -> None:
    if not tolerance > 0:
        raise ConfigError(f"{section}.sinkhorn_tolerance: {tolerance} must be > 0 (e.g. 1e-3)")
    _at_least(f"{section}.sinkhorn_max_iters", max_iters, 1)


def _finite_floats(value: Any, key: str = "") -> None:
    """NaN and infinity pass every range check (comparisons with NaN are false), so refuse them
    first, in every float field of every section, nested lists and maps included."""
    if hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            _finite_floats(getattr(value, name), f"{key}.{name}" if key else name)
    elif isinstance(value, dict):
        for name, item in value.items():
            _finite_floats(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _finite_floats(item, f"{key}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number; give a finite value")


def validate(config: Config) -> None:
    """Check choices and ranges; raise `ConfigError` naming the first bad key."""
    _finite_floats(config)
    task, source, s1, s2, s3 = config.task, config.source, config.stage1, config.stage2, config.stage3
    _choice("task.name", task.name, TASKS)
    for key in ("resolution", "downsample", "n_classes"):
        _at_least(f"task.{key}", getattr(task, key), 1)
    generated = task.name not in ("cifar10", "cifar100") and task.file is None
    for key in ("n_train", "n_test"):
        value = getattr(task, key)
        if value is not None:
            _at_least(f"task.{key}", value, 1)
        elif generated:
            raise ConfigError(f"task.{key}: generated data needs a sample count, not null")
    _in_range("task.val_fraction", task.val_fraction, 0.0, 0.9)
    for key in ("file", "test_file"):
        value = getattr(task, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"task.{key}: {value} does not exist (set it to a local file, or null to generate)")
    _validate_dials(task)
    if task.name.startswith("procedural") and source.model == "offline" and task.data_seed != source.pretrain.seed:
        raise ConfigError(f"task.data_seed: {task.data_seed} must equal source.pretrain.seed "
                          f"({source.pretrain.seed}) so the target's classes are held-out classes of the "
                          "source body's procedural family")
    if source.checkpoint is not None and not Path(source.checkpoint).is_file():
        raise ConfigError(f"source.checkpoint: {source.checkpoint} does not exist")
    if source.model == "offline" and (source.pretrained or source.checkpoint):
        raise ConfigError("source.model: 'offline' is built by pretrain-source; unset source.pretrained/checkpoint")
    _choice("source.proxy", source.proxy, SOURCE_PROXIES)
    _at_least("source.proxy_samples", source.proxy_samples, 2)
    _validate_pretrain(source.pretrain)
    _at_least("stage1.epochs", s1.epochs, 0)
    _choice("stage1.distance", s1.distance, ALIGN_DISTANCES)
    _choice("stage1.otdd_inner", s1.otdd_inner, OTDD_INNER)
    _choice("stage1.embedder_init", s1.embedder_init, EMBEDDER_INITS)
    _at_least("stage1.entropic_reg", s1.entropic_reg, 1e-6)
    _sinkhorn("stage1", s1.sinkhorn_tolerance, s1.sinkhorn_max_iters)
    _at_least("stage1.max_samples", s1.max_samples, 2)
    _at_least("stage1.batch_size", s1.batch_size, 2)
    _at_least("stage1.lr", s1.lr, 0.0)
    _at_least("stage1.n_pseudo_labels", s1.n_pseudo_labels, 1)
    _choice("stage2.distance", s2.distance, GAP_DISTANCES)
    _choice("stage2.otdd_inner", s2.otdd_inner, OTDD_INNER)
    _at_least("stage2.entropic_reg", s2.entropic_reg, 1e-6)
    _sinkhorn("stage2", s2.sinkhorn_tolerance, s2.sinkhorn_max_iters)
    _at_least("stage2.n_pseudo_labels", s2.n_pseudo_labels, 1)
    _at_least("stage2.permutations", s2.permutations, 20)
    _at_least("stage2.bootstraps", s2.bootstraps, 20)
    _choice("stage2.link", s2.link, RANK_LINKS)
    _choice("stage2.decision", s2.decision, RANK_DECISIONS)
    if s2.allocation == "ibp":
        raise ConfigError("stage2.allocation: 'ibp' is now called 'gap-relative' (alpha_i = alpha_0 g(D_i / mean D), "
                          "a within-task allocation); 'gap' is the absolute link alpha_0 g(D_i / D_ref)")
    _choice("stage2.allocation", s2.allocation, RANK_ALLOCATIONS)
    if (s2.allocation == "law") != (s2.law is not None):
        raise ConfigError("stage2.law: allocation 'law' reads its ranks from a rank_law.json (orca-lora calibrate); "
                          "set both stage2.allocation=law and stage2.law=PATH, or neither")
    if s2.law is not None:
        if not Path(s2.law).is_file():
            raise ConfigError(f"stage2.law: {s2.law} does not exist; write one with `orca-lora calibrate DIR... "
                              f"--output {s2.law}`")
        if s2.budget is not None or s2.match_uniform_budget:
            raise ConfigError("stage2.law: a fitted law sets the ranks itself; drop stage2.budget and "
                              "stage2.match_uniform_budget")
    _validate_gap_reference(s2)
    _validate_posterior_run(s2)
    _in_range("stage2.quantile", s2.quantile, 0.0, 1.0)
    _at_least("stage2.max_samples", s2.max_samples, 4)
    _at_least("stage2.r_min", s2.r_min, 1)
    _at_least("stage2.r_max", s2.r_max, s2.r_min)
    if s2.alpha0 is not None:
        _at_least("stage2.alpha0", s2.alpha0, 0.0)
    if s2.budget is not None:
        _at_least("stage2.budget", s2.budget, 1)
        if s2.alpha0 is not None:
            raise ConfigError("stage2.budget: set either stage2.alpha0 or stage2.budget, not both "
                              "(a budget fits alpha0)")
    if s2.match_uniform_budget and (s2.alpha0 is not None or s2.budget is not None):
        raise ConfigError("stage2.match_uniform_budget: it sets the budget from stage3.rank; "
                          "drop stage2.alpha0 and stage2.budget")
    if s2.allocation in BUDGETED_ALLOCATIONS and s2.budget is None and not s2.match_uniform_budget:
        raise ConfigError(f"stage2.budget: allocation {s2.allocation!r} scales its per-module scores to a parameter "
                          "budget; set stage2.budget=N (adapter parameters sum r (d_in + d_out)) or "
                          "stage2.match_uniform_budget=true (what a uniform stage3.rank costs)")
    _validate_stage3(s3)
    from orca_lora.adapters.spec import get_method  # torch, only once every name has been checked

    get_method(s3.method).validate_ranks(s2)
    if s2.allocation in TRAINING_ALLOCATIONS:
        _validate_training_allocation(s2.allocation, s3)
    if s3.rank_map and s2.enabled:
        raise ConfigError("stage3.rank_map: an explicit rank map replaces stage 2; set stage2.enabled=false")
    _validate_trainer(config.trainer)


def _validate_gap_reference(s2: Stage2Config) -> None:
    """D_ref of the absolute link, read by `gap` and by `shuffled` (which permutes `gap`'s gaps)."""
    if s2.gap_reference is None:
        return
    if not s2.gap_reference > 0:
        raise ConfigError(f"stage2.gap_reference: {s2.gap_reference} must be > 0 (a gap in stage2.distance's units)")
    if s2.allocation not in ("gap", "shuffled"):
        raise ConfigError(f"stage2.gap_reference: only allocation 'gap' (and 'shuffled', which permutes its gaps) "
                          f"divides by it, not {s2.allocation!r}; unset it or set stage2.allocation=gap")
    # linear and sqrt are homogeneous, g(D / c) = g(D) g(1 / c): a fitted alpha_0 absorbs the constant
    if s2.allocation == "gap" and s2.link in ("linear", "sqrt") and (s2.budget is not None or s2.match_uniform_budget):
        raise ConfigError(f"stage2.link: under link {s2.link!r} a constant stage2.gap_reference only rescales every "
                          "block's mass, which the alpha_0 fitted to the budget absorbs, so allocation 'gap' would "
                          "give exactly gap-relative's ranks; set stage2.link=log1p, or unset stage2.gap_reference "
                          "to divide each gap by its block's noise floor")


def _validate_posterior_run(s2: Stage2Config) -> None:
    """ibp-posterior reads a finished ibp-lora run's metrics.json. Whether that run has finished is
    checked before stage 1 (`preflight`), not here: a sweep validates every point before it runs the
    ibp-lora points that the ibp-posterior ones read."""
    if (s2.allocation == "ibp-posterior") != (s2.posterior_run is not None):
        raise ConfigError("stage2.posterior_run: allocation 'ibp-posterior' takes its ranks from a finished ibp-lora "
                          "run's directory; set both stage2.allocation=ibp-posterior and stage2.posterior_run=DIR, "
                          "or neither")


def _validate_dials(task: TaskConfig) -> None:
    """Ranges of the generated family's dials (each checked for the task that reads it)."""
    if task.name == "procedural-noise":
        _in_range("task.noise", task.noise, 0.0, 1.0)
    if task.name == "procedural-permuted":
        _in_range("task.permute_fraction", task.permute_fraction, 0.0, 1.0)
        if task.tile < 1 or task.resolution % task.tile:
            raise ConfigError(f"task.tile: {task.tile} must be >= 1 and divide task.resolution ({task.resolution})")
    if task.name == "helmholtz":
        _in_range("task.wavenumber", task.wavenumber, 1.0, 4.0)
    if task.name == "heat" and not task.time > 0:
        raise ConfigError(f"task.time: {task.time} must be > 0")
    if task.name in ("poisson", "helmholtz", "heat", "spectrogram", "grf-texture"):
        _at_least("task.resolution", task.resolution, 4)


def _validate_pretrain(pretrain: PretrainConfig) -> None:
    for key in ("img_size", "patch_size", "window_size", "embed_dim", "n_classes", "samples_per_class",
                "epochs", "batch_size"):
        _at_least(f"source.pretrain.{key}", getattr(pretrain, key), 1)
    if len(pretrain.depths) != len(pretrain.num_heads):
        raise ConfigError("source.pretrain.num_heads: needs one entry per stage in source.pretrain.depths")
    _in_range("source.pretrain.val_fraction", pretrain.val_fraction, 0.01, 0.9)
    _at_least("source.pretrain.lr", pretrain.lr, 0.0)


def _validate_stage3(s3: Stage3Config) -> None:
    _choice("stage3.method", s3.method, choices.METHODS)  # read per call: tests register methods at run time
    _choice("stage3.schedule", s3.schedule, SCHEDULES)
    _at_least("stage3.rank", s3.rank, 1)
    _at_least("stage3.alpha", s3.alpha, 0.0)
    _in_range("stage3.dropout", s3.dropout, 0.0, 0.99)
    if not s3.targets:
        raise ConfigError("stage3.targets: give at least one module-name pattern")
    _at_least("stage3.batch_size", s3.batch_size, 1)
    _at_least("stage3.lr", s3.lr, 0.0)
    _at_least("stage3.weight_decay", s3.weight_decay, 0.0)
    _at_least("stage3.warmup_steps", s3.warmup_steps, 0)
    _at_least("stage3.grad_clip", s3.grad_clip, 0.0)
    _at_least("stage3.loraplus_ratio", s3.loraplus_ratio, 0.0)
    _at_least("stage3.delta_start_step", s3.delta_start_step, 0)
    _at_least("stage3.dylora_min_rank", s3.dylora_min_rank, 1)
    _at_least("stage3.allocation_batches", s3.allocation_batches, 1)
    _at_least("stage3.eva_rho", s3.eva_rho, 1.0)
    _in_range("stage3.eva_tau", s3.eva_tau, 0.01, 1.0)
    _at_least("stage3.adalora_init_ratio", s3.adalora_init_ratio, 1.0)
    _in_range("stage3.adalora_tinit", s3.adalora_tinit, 0.0, 0.9)
    _in_range("stage3.adalora_tfinal", s3.adalora_tfinal, 0.0, 0.9)
    if s3.adalora_tinit + s3.adalora_tfinal >= 1.0:
        raise ConfigError("stage3.adalora_tfinal: adalora_tinit + adalora_tfinal must be < 1 (the budget shrinks "
                          "between them); lower one of them")
    _at_least("stage3.adalora_delta_t", s3.adalora_delta_t, 1)
    _in_range("stage3.adalora_beta1", s3.adalora_beta1, 0.01, 0.999)
    _in_range("stage3.adalora_beta2", s3.adalora_beta2, 0.01, 0.999)
    _at_least("stage3.adalora_orth_reg_weight", s3.adalora_orth_reg_weight, 0.0)
    # the method's own rules live in its spec; the spec registry imports torch, which this module does not
    from orca_lora.adapters.spec import get_method

    get_method(s3.method).validate(s3)


def _validate_training_allocation(allocation: str, s3: Stage3Config) -> None:
    """What each stage-3 allocation needs of stage 3 (finetune/allocations/)."""
    from orca_lora.adapters.inject import LinearAdapterMethod  # torch, once every name has been checked
    from orca_lora.adapters.spec import get_method

    if allocation in ("eva", "adalora") and s3.method != "lora":
        what = "initialises LoRA's A" if allocation == "eva" else "trains PEFT's AdaLoRA in place of LoRA"
        raise ConfigError(f"stage3.method: allocation {allocation} {what}; set stage3.method=lora (got {s3.method!r})")
    if allocation == "adalora" and s3.early_stopping_patience:
        raise ConfigError("stage3.early_stopping_patience: adalora's budget schedule runs to the last training step; "
                          "set it to 0")
    if allocation == "gradient" and (s3.method == "ibp-lora"
                                     or not isinstance(get_method(s3.method), LinearAdapterMethod)):
        raise ConfigError(f"stage3.method: allocation gradient sets the rank of a LoRA-style adapter per module; "
                          f"{s3.method!r} takes none; use e.g. lora, dora or lora-plus")


def _validate_trainer(trainer: TrainerConfig) -> None:
    _at_least("trainer.max_epochs", trainer.max_epochs, 1)
    _at_least("trainer.num_nodes", trainer.num_nodes, 1)
    _at_least("trainer.num_workers", trainer.num_workers, 0)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = getattr(trainer, key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"trainer.{key}: {value!r} must be a positive fraction or batch count")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def section_hash(config: Config, *sections: str) -> str:
    """Short stable hash of the named sections: a stage is redone only when its inputs change."""
    payload = {name: _plain(getattr(config, name)) for name in sections}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def run_path(config: Config) -> Path:
    """`<output.root>/<output.name>/`, the run's directory (not created)."""
    return Path(config.output.root) / (config.output.name or "run")


def run_directory(config: Config) -> Path:
    """Create `run_path(config)` and write the resolved config into it."""
    directory = run_path(config)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "config.yaml", to_yaml(config))
    return directory
