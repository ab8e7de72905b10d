"""Typed configuration: one YAML file per experiment, validated into dataclasses.

The schema and the run's paths; reading, merging and checking a file is `config_load.py`'s
(`load_config`), so this module imports nothing above it. A finished run's saved config is read back
unchecked by `read_saved`: its files may have moved since it ran.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orca_lora.errors import ConfigError  # noqa: F401  (re-exported: raised by every config check)
from orca_lora.files import write_text_atomic

DEFAULT_TARGETS = (r"\.attn\.qkv$", r"\.attn\.proj$", r"\.mlp\.fc1$", r"\.mlp\.fc2$")


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
    planted_k: int = 4  # planted tasks: dimension of the plant (patch map, or module change), its needed rank
    planted_angle: float = 1.5707963267948966  # planted-shift: rotation angle of its planes, in (0, pi]
    planted_planes: Optional[int] = None  # planted tasks: seed of the planted directions; null: task.data_seed
    planted_module: str = "layers.0.blocks.0.mlp.fc1"  # planted-function: the body's Linear the teacher changes
    planted_scale: float = 0.5  # planted-function: each planted direction's effect / the Linear's largest, in (0, 10]


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
    # {block index: rank} in place of stage3.rank in that block's adapted modules (per-block sweeps); stage 2
    # still measures every gap (stage2.allocation uniform, or stage 2 off)
    block_ranks: dict[int, int] = field(default_factory=dict)
    train_embedder: bool = True  # false: the embedder stays as stage 1 left it (only adapters and head adapt)
    # false: the frozen body's stochastic depth (timm's Swin default drop_path_rate 0.1) stays off while
    # the adapters train, so a target the body computes deterministically (the known-answer controls) is reachable
    body_stochastic_depth: bool = True
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
    # ibp-lora: components per module (capped at min(d_out, d_in)); None: stage2.r_max, filled in by
    # load_config, so the Config and the saved config.yaml hold the number
    ibp_r_max: Optional[int] = None
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
    # stage 3's logs: csv, stage3/logs/version_0/metrics.csv (what the analyses read); tensorboard, that file
    # and TensorBoard's event files beside it (pip install orca-lora[tensorboard])
    logger: str = "csv"


@dataclass
class OutputConfig:
    root: str = "runs"
    name: Optional[str] = None  # None: the config file's stem
    # a folder of finished stage-1/2 results by config hash, copied instead of recomputed (sweeps set it)
    shared_stages: Optional[str] = None


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


@functools.lru_cache(maxsize=1)
def config_schema() -> DictConfig:
    """The typed schema every config is merged onto; built once (about 0.1 s each time, and a sweep
    loads one config per point). `OmegaConf.merge` copies it, so the cached one is never changed."""
    return OmegaConf.structured(Config)


def read_saved(path: Path) -> Config:
    """A finished run's `config.yaml` as a `Config`, without the load-time checks (the data files it
    names may have moved since it ran; the run has already passed them)."""
    return OmegaConf.to_object(OmegaConf.merge(config_schema(), OmegaConf.load(path)))


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# Keys added after runs were made: left out of the hash while at their default (read from the section's
# dataclass), so a finished run made before a key existed keeps its hash (and is not redone) when nothing
# it ran changes.
LATER_KEYS = {"task": ("planted_k", "planted_angle", "planted_planes", "planted_module",
                      "planted_scale"), "stage3": ("body_stochastic_depth",)}


def section_hash(config: Config, *sections: str) -> str:
    """Short stable hash of the named sections: a stage is redone only when its inputs change."""
    payload = {name: _plain(getattr(config, name)) for name in sections}
    for name, keys in LATER_KEYS.items():
        if name in payload:
            defaults = type(getattr(config, name))()
            payload[name] = {key: value for key, value in payload[name].items()
                             if not (key in keys and value == getattr(defaults, key))}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def saved_config_matches(path: Path, config: Config) -> bool:
    """Whether the config a run saved at `path` is `config`, compared by `section_hash` over every section,
    so a run saved before a LATER_KEYS key existed still matches while that key is at its default (its text
    lacks the key); a saved config that no longer loads (a key since removed) matches nothing."""
    try:
        saved = read_saved(path)
    except OmegaConfBaseException:
        return False
    sections = [item.name for item in fields(Config)]
    return section_hash(saved, *sections) == section_hash(config, *sections)


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
