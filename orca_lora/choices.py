"""The names every registry answers to, importable without torch, timm or PEFT.

`config_load.validate` checks a config's names against these tables, so a typo is refused before any
heavy import. Each registry (tasks, distances, links, decisions, embedder inits, stage-3 methods)
fills itself where its code lives; `check_registry` (called by the tests, and by each registry's
lookup) fails when a registry and its table drift apart, so a new entry is one name here plus its
registered code.
"""
from __future__ import annotations

from typing import Iterable, Sequence

TASKS = ("darcy", "cifar10", "cifar100", "procedural", "procedural-noise", "procedural-permuted",
         "procedural-inverted", "procedural-fourier", "digits", "spectrogram", "grf-texture", "poisson",
         "helmholtz", "heat", "planted-shift", "planted-function")  # data/tasks.py, task_builders.py, planted_tasks.py
PLANTED_TASKS = ("planted-shift", "planted-function")  # the known-answer controls: planted_k is their needed rank
SOURCE_PROXIES = ("procedural", "cifar10")
DISTANCES = ("otdd", "mmd", "c2st", "spectral")  # align/distances.py (spectral: rank/spectral.py)
ALIGN_DISTANCES = ("otdd", "mmd")  # the differentiable ones, which stage 1 can train on
GAP_DISTANCES = DISTANCES
OTDD_INNER = ("exact", "gaussian")
EMBEDDER_INITS = ("random", "source")  # models/embedder.py
RANK_LINKS = ("linear", "sqrt", "log1p")  # rank/select.py
RANK_DECISIONS = ("mean", "mode", "quantile", "sample")  # rank/select.py
RANK_ALLOCATIONS = ("gap-relative", "gap", "flat", "law", "uniform", "shuffled", "depth-increasing",
                    "depth-decreasing", "stable-rank", "ibp-posterior", "gradient", "eva",
                    "adalora")  # rank/allocations/: one module per allocation registers it
TRAINING_ALLOCATIONS = ("gradient", "eva", "adalora")  # phase stage3: they need the training model
# scale per-module scores to a parameter budget (rank/budget.py), so they need stage2.budget or
# stage2.match_uniform_budget; the stage-3 ones are handed that budget by stage 2
BUDGETED_ALLOCATIONS = ("depth-increasing", "depth-decreasing", "stable-rank", "ibp-posterior") + TRAINING_ALLOCATIONS
GAP_AWARE_ALLOCATIONS = ("gap-relative", "gap", "law")  # the allocations whose ranks follow the gaps
METHODS = ("lora", "delta-lora", "lora-plus", "dylora", "dora", "qlora", "mora", "sbora-fa", "sbora-fb",
           "houlsby", "ibp-lora", "full", "linear")  # adapters/: one module per method registers its spec
SCHEDULES = ("cosine", "step", "constant")
PAIRED_TESTS = ("t", "wilcoxon")  # studies/stats/paired.py: tests against uniform over test samples
LOGGERS = ("csv", "tensorboard")  # trainer.logger: finetune/stage.py; CSV always, TensorBoard's events besides


def check_registry(what: str, registered: Iterable[str], names: Sequence[str]) -> None:
    """Raise when the names a registry holds differ from its light table in this module."""
    registered = set(registered)
    extra, missing = sorted(registered - set(names)), sorted(set(names) - registered)
    if extra or missing:
        raise RuntimeError(f"the {what} registry and orca_lora/choices.py disagree: registered but not listed "
                           f"{extra}, listed but not registered {missing}; add the name to choices.py or "
                           "register its code")
