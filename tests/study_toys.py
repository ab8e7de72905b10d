"""Synthetic run directories of the rank-vs-gap study (configs/study_gap.yaml), written with the run_files
writers and without training, for the analysis tests (study_runs, hypothesis, method_shares, block_evidence).

`write_study_run` writes one complete run (config.yaml, metrics.json, stage2/gaps.csv,
stage3/sample_errors.npz); `write_study` a whole study with planted rank curves."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml
from omegaconf import OmegaConf

from orca_lora.config import to_yaml
from orca_lora.config_load import load_config
from orca_lora.records import GapRow, RunMetrics, SampleErrors
from orca_lora.run_files import RunFiles, write_gaps, write_metrics, write_sample_errors

BLOCKS = tuple(f"layers.{layer}.blocks.{block}" for layer in range(3) for block in range(2))
MODULE_KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
RANKS = (1, 2, 4, 8, 16, 32)


def modules(block: str) -> list[str]:
    return [f"body.{block}.{kind}" for kind in MODULE_KINDS]


@lru_cache(maxsize=None)
def _base_config(overrides: tuple[str, ...]) -> dict:
    """The validated resolved config of these overrides (load_config then to_yaml), as a plain dict.
    Cached: load_config costs 0.1-0.5 s here, so the plain per-run scalars (task name, seed, rank,
    epochs, embedder setting, which block) are set on a copy of it instead."""
    return OmegaConf.to_container(OmegaConf.create(to_yaml(load_config(None, list(overrides)))))


def write_study_run(root: Path, name: str, *, task: str = "darcy", method: str = "lora", rank: int = 8, seed: int = 0,
                    allocation: str = "uniform", train_embedder: bool = False, epochs: int = 6,
                    block_ranks: Optional[dict[int, int]] = None, val_errors, test_errors, block_gaps,
                    posterior_ranks: Optional[dict[str, int]] = None, extra_overrides: Sequence[str] = ()) -> RunFiles:
    """One finished run directory `root/name`. `block_gaps`: the floor-corrected gap per block (6 blocks);
    `posterior_ranks`: ibp-lora's module -> posterior rank (module names as in metrics.json);
    `extra_overrides`: `key=value` settings on top (e.g. stage1.epochs=3)."""
    overrides = [f"stage3.method={method}", f"stage2.allocation={allocation}", "stage1.embedder_init=random",
                 *extra_overrides]
    if block_ranks:
        overrides.append("stage3.block_ranks={0: 1}")  # validated once; the real blocks are set below
    config = copy.deepcopy(_base_config(tuple(overrides)))
    config["seed"], config["task"]["name"], config["trainer"]["max_epochs"] = int(seed), task, int(epochs)
    config["stage3"].update(rank=int(rank), train_embedder=bool(train_embedder),
                            block_ranks={int(k): int(v) for k, v in (block_ranks or {}).items()})
    run = RunFiles(Path(root) / name)
    run.root.mkdir(parents=True)
    run.config.write_text(yaml.safe_dump(config, sort_keys=False))
    val, test, gaps = (np.asarray(a, float) for a in (val_errors, test_errors, block_gaps))
    if gaps.shape != (len(BLOCKS),):
        raise ValueError(f"block_gaps needs one gap per block ({len(BLOCKS)}), got {gaps.shape}")
    per_block = {index: (block_ranks or {}).get(index, rank) for index in range(len(BLOCKS))}
    ranks = {module: per_block[index] for index, block in enumerate(BLOCKS) for module in modules(block)}
    write_metrics(run, RunMetrics(
        task=task, method=method, rank=rank, gap_aware=False, seed=seed, test_error=float(test.mean()),
        baseline_error=1.0, best_val_error=float(val.mean()), trainable_params=1000 + 200 * sum(ranks.values()),
        ranks=ranks, mean_gap=float(gaps.mean()), alignment={}, stage_seconds={}, device="cpu", torch="x",
        allocation=allocation, posterior_ranks=posterior_ranks))
    write_gaps(run, [GapRow(index, block, 48, gap + 0.01, 0.01, 0.001, gap, gap + 0.02, gap, per_block[index])
                     for index, (block, gap) in enumerate(zip(BLOCKS, gaps))])
    write_sample_errors(run, SampleErrors(val=val, test=test))
    return run


def planted_curve(ranks: Sequence[int], r_star: int, e_inf: float = 0.1, unadapted: float = 0.3) -> np.ndarray:
    """Noiseless e(r) whose plan r* (the log-gain rule: the smallest rank with e(r) <= e_best (e(0) / e_best)^0.1,
    e(0) = `unadapted`, the toy study's linear runs) is r_star: e_inf from r* on, and below it the share of the
    log gain left, ln(e(r) / e_inf) / ln(e(0) / e_inf), falling linearly in log2 r from 0.5 to 0.2;
    r* = the smallest rank: rising by 0.01 per doubling (the smallest rank is the best)."""
    log_ranks = np.log2(np.asarray(ranks, float) / ranks[0])
    if r_star == ranks[0]:
        return e_inf + 0.01 * log_ranks
    fraction = log_ranks / math.log2(r_star / ranks[0])
    return np.where(fraction >= 1, e_inf, e_inf * (unadapted / e_inf) ** (0.5 - 0.3 * fraction))


@dataclass
class StudyTask:
    name: str
    gap: float  # the planted block-mean gap
    r_star: int  # the planted validation r*
    block_gaps: np.ndarray = field(default_factory=lambda: np.zeros(len(BLOCKS)))


@dataclass
class Study:
    root: Path
    tasks: list[StudyTask]
    seeds: tuple[int, ...]
    ranks: tuple[int, ...]
    errors: dict = field(default_factory=dict)  # run name -> (val, test)


def write_study(root: Path, *, seed: int = 0, tasks: Sequence[tuple[str, float, int]] = (
        ("procedural", 0.02, 1), ("darcy", 0.1, 4), ("spectrogram", 0.4, 8), ("grf-texture", 1.0, 32)),
        seeds: Sequence[int] = (0, 1), ranks: Sequence[int] = RANKS, n_val: int = 40, n_test: int = 50,
        noise: float = 0.002, secondary_tasks: Sequence[str] = ("darcy",)) -> Study:
    """A whole synthetic study, deterministic in `seed`: per task (name, mean gap, planted r*) the LoRA
    sweep (frozen embedder, 6 epochs) over `ranks` and `seeds` with validation curves planted at r*,
    linear (error 0.3), full (0.08) and ibp-lora (allocation flat, posterior rank 2 * block index + 1 in
    every module); on `secondary_tasks` one block at rank 1 (the others at 8: error up by 0.01 x its gap over
    the mean gap), the trained-embedder regime at ranks 1 and 32 on seeds 0, 1, and r = 8 at 30 epochs on seed 0."""
    rng = np.random.default_rng(seed)
    study = Study(Path(root), [], tuple(seeds), tuple(ranks))
    spread = np.linspace(0.5, 1.5, len(BLOCKS))
    for name, gap, r_star in tasks:
        task = StudyTask(name, gap, r_star, gap * spread)
        study.tasks.append(task)
        curve = planted_curve(ranks, r_star)

        def errors(mean: float, size: int) -> np.ndarray:
            return mean + noise * rng.standard_normal(size)

        def write(run_name: str, val_mean: float, test_mean: float, **settings) -> None:
            val, test = errors(val_mean, n_val), errors(test_mean, n_test)
            study.errors[run_name] = (val, test)
            write_study_run(root, run_name, task=name, val_errors=val, test_errors=test,
                            block_gaps=task.block_gaps * (1 + 0.01 * rng.standard_normal(len(BLOCKS))), **settings)

        for s in seeds:
            for r, e in zip(ranks, curve):
                write(f"{name}_lora_r{r}_s{s}", e, e + 0.01, rank=r, seed=s)
            write(f"{name}_linear_s{s}", 0.3, 0.31, method="linear", seed=s)
            write(f"{name}_full_s{s}", 0.08, 0.09, method="full", seed=s)
            posterior = {module: 2 * index + 1 for index, block in enumerate(BLOCKS) for module in modules(block)}
            write(f"{name}_ibp_s{s}", 0.12, 0.13, method="ibp-lora", allocation="flat", seed=s,
                  posterior_ranks=posterior)
        if name in secondary_tasks:
            at_eight = curve[list(ranks).index(8)] if 8 in ranks else curve[-1]
            for s in (0, 1):
                for block in range(len(BLOCKS)):
                    write(f"{name}_b{block}_s{s}", at_eight + 0.01 * task.block_gaps[block] / gap, at_eight,
                          rank=8, seed=s, block_ranks={block: 1})
                for r in (ranks[0], ranks[-1]):
                    write(f"{name}_trained_r{r}_s{s}", curve[list(ranks).index(r)] - 0.01,
                          curve[list(ranks).index(r)] - 0.005, rank=r, seed=s, train_embedder=True)
            write(f"{name}_e30_s0", at_eight - 0.002, at_eight - 0.003, rank=8, seed=0, epochs=30)
    return study
