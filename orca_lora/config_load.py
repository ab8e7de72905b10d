"""Read, merge and check a config: `load_config` merges the schema (`config.py`), the YAML file and
dotted overrides, then checks choices and ranges, each naming the key, the bad value and the valid
choices (or the fix), so a mistake fails before any expensive work. Structure and types are
OmegaConf's; cross-section rules that need the source body's shapes are `preflight.py`'s."""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orca_lora import choices
from orca_lora.choices import (
    ALIGN_DISTANCES,
    BUDGETED_ALLOCATIONS,
    EMBEDDER_INITS,
    GAP_DISTANCES,
    LOGGERS,
    OTDD_INNER,
    PLANTED_TASKS,
    RANK_ALLOCATIONS,
    RANK_DECISIONS,
    RANK_LINKS,
    SCHEDULES,
    SOURCE_PROXIES,
    TASKS,
    TRAINING_ALLOCATIONS,
)
from orca_lora.config import (Config, PretrainConfig, Stage2Config, Stage3Config, TaskConfig, TrainerConfig,
                              config_schema)
from orca_lora.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), allow_empty: bool = False,
                shared: Sequence[str] = ()) -> Config:
    """Read a YAML file (or the defaults) plus `a.b=c` overrides into a validated `Config`, with a
    null that stands for another key's value filled in (`_resolve`).

    `shared` are overrides applied before `overrides` that many calls have in common (a sweep's `set`):
    the file and they are merged once and reused. A file with no sections is refused unless
    `allow_empty` (the CLI's --defaults): an empty file would otherwise run the whole default
    pipeline without a word."""
    path = None if path is None else Path(path)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    everything = [*shared, *overrides]
    for item in everything:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stage3.rank=8)")
    where = ("defaults" if path is None else str(path)) + (" with --set " + " ".join(everything) if everything else "")
    stamp = None if path is None else path.stat().st_mtime_ns
    try:
        merged = OmegaConf.merge(_base_layer(path, stamp, tuple(shared), allow_empty),
                                 OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_describe(error)}") from None
    if config.output.name is None and path is not None:
        config.output.name = path.stem
    validate(config)
    _resolve(config)
    return config


def _resolve(config: Config) -> None:
    """Fill in the values a null stands for, so the `Config` (and the run's saved config.yaml) holds
    what runs: ibp-lora's stage3.ibp_r_max null is stage2.r_max. Only ibp-lora reads it, so other
    methods keep the null and their stage-3 hash."""
    if config.stage3.method == "ibp-lora" and config.stage3.ibp_r_max is None:
        config.stage3.ibp_r_max = config.stage2.r_max


@functools.lru_cache(maxsize=16)
def _base_layer(path: Path | None, stamp: int | None, shared: tuple[str, ...], allow_empty: bool) -> DictConfig:
    """The schema, the file (as of its modification time `stamp`) and the shared overrides, merged."""
    layers = [config_schema()]
    if path is not None:
        layers.append(_load_yaml(path, allow_empty))
    layers.append(OmegaConf.from_dotlist(list(shared)))
    return OmegaConf.merge(*layers)


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
    if task.name in PLANTED_TASKS and (source.model != "offline" or task.resolution != source.pretrain.img_size):
        raise ConfigError(f"task.resolution: {task.name} draws fresh images of the offline source body's classes "
                          f"at its size; needs source.model offline and task.resolution = source.pretrain.img_size "
                          f"({source.pretrain.img_size})")
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
    _validate_block_ranks(s2, s3)
    _validate_trainer(config.trainer)


def _validate_block_ranks(s2: Stage2Config, s3: Stage3Config) -> None:
    if not s3.block_ranks:
        return
    if s3.rank_map:
        raise ConfigError("stage3.block_ranks: set either stage3.rank_map (every module's rank) or "
                          "stage3.block_ranks (overrides of stage3.rank per block), not both")
    if s2.enabled and s2.allocation != "uniform":
        raise ConfigError(f"stage3.block_ranks: overrides uniform ranks, but stage2.allocation is {s2.allocation!r}; "
                          "set stage2.allocation=uniform")
    for block, rank in s3.block_ranks.items():
        if block < 0 or rank < 1:
            raise ConfigError(f"stage3.block_ranks: {{{block}: {rank}}} needs a block index >= 0 and a rank >= 1")


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
    if task.name in PLANTED_TASKS:
        _at_least("task.planted_k", task.planted_k, 1)
        if not 0 < task.planted_angle <= math.pi:
            raise ConfigError(f"task.planted_angle: {task.planted_angle} must be in (0, pi]")
        if task.planted_planes is not None:
            _at_least("task.planted_planes", task.planted_planes, 0)
        if not 0 < task.planted_scale <= 10:
            raise ConfigError(f"task.planted_scale: {task.planted_scale} must be in (0, 10]")


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
    from orca_lora.adapters.inject import LinearAdapterMethod
    from orca_lora.adapters.spec import get_method

    method = get_method(s3.method)
    if isinstance(method, LinearAdapterMethod) and not s3.alpha > 0:
        # checked here, not where stage 3 builds the layers: after stages 1 and 2 have run
        raise ConfigError(f"stage3.alpha: {s3.alpha} must be > 0 for {s3.method}, whose update it scales "
                          "(s = alpha / r; alpha 0 adds nothing); set e.g. stage3.alpha=16, the default")
    method.validate(s3)


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
    _choice("trainer.logger", trainer.logger, LOGGERS)
    if trainer.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("trainer.logger: 'tensorboard' needs the tensorboard package, which is not installed: "
                          "pip install orca-lora[tensorboard] (or set trainer.logger=csv)")
    _at_least("trainer.max_epochs", trainer.max_epochs, 1)
    _at_least("trainer.num_nodes", trainer.num_nodes, 1)
    _at_least("trainer.num_workers", trainer.num_workers, 0)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = getattr(trainer, key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"trainer.{key}: {value!r} must be a positive fraction or batch count")
