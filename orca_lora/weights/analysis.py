"""Rank analysis of finished runs: weight-change spectra, minimal ranks and LoRA subspace similarity.

For every run, each adapted Linear's weight change E = W_trained - W0 (for plain LoRA the update
s B A itself) gets its singular values, energy rank and best rank-r error, r being the LoRA rank the
run gave the module (for ibp-lora the posterior rank it was pruned to; for a `full` run, the rank stage 2
chose for it). For every pair of adapter
runs, the A matrices of each module they share are compared by phi(A1, A2, i, j). So
`analyze_runs([lora_a, lora_b])` gives heat maps and both runs' update spectra, `analyze_runs([full])`
the minimal-rank table, and a mix gives each where it applies. The math is in subspace.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

from safetensors.torch import load_file
from torch import Tensor, nn

from orca_lora.adapters.spec import METHODS, get_method
from orca_lora.config import Config, read_saved
from orca_lora.models.model import BODY_PREFIX
from orca_lora.models.source import load_source_body
from orca_lora.run_files import RunFiles, diverged, read_effective_ranks, read_metrics
from orca_lora.weights.subspace import RankDiagnostic, random_subspace_similarity, rank_diagnostic, subspace_similarity

MODEL_PREFIX = "model."  # stage 3 saves the FinetuneModule's state, which holds the OrcaModel as `model`


class FrozenWeights:
    """W0 from the source bodies the runs started from, each body loaded once."""

    def __init__(self) -> None:
        self._bodies: dict[str, nn.Module] = {}

    def weight(self, config: Config, module: str, shape: tuple[int, int]) -> Tensor:
        key = f"{config.source!r} in {config.data_root}"
        if key not in self._bodies:
            self._bodies[key] = load_source_body(config.source, config.data_root)
        weight = self._bodies[key].get_submodule(module.removeprefix(BODY_PREFIX)).weight
        if tuple(weight.shape) != shape:
            raise ValueError(f"{module}: the run trained a {shape} weight but the source body in config.yaml has "
                             f"{tuple(weight.shape)}; its source and data_root must name the body the run trained")
        return weight.detach().double()


@dataclass
class RunWeights:
    label: str
    directory: Path
    method: str
    ranks: dict[str, int]  # module -> its LoRA rank (for a full run, the rank stage 2 chose)
    changes: dict[str, Tensor]  # module -> E = W_trained - W0, float64 (d_out x d_in)
    lora_A: dict[str, Tensor]  # module -> A (r x d_in); empty for a full run


def check_run(directory: Path) -> Config:
    """The run's resolved config, once its files show it finished with a method that changes body weights."""
    run = RunFiles(directory)
    config_file = run.config
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {directory} is not a run directory; pass the "
                                "runs/<name>/ directories that `orca-lora run` writes")
    config = read_saved(config_file)
    if get_method(config.stage3.method).weight_change is None:
        analysed = sorted(name for name, spec in METHODS.items() if spec.weight_change is not None)
        raise ValueError(f"{config_file}: stage3.method={config.stage3.method!r} has no weight change W - W0 "
                         f"to analyse (rules exist for {analysed}); pass runs of those methods")
    for needed in (run.ranks, run.trainable, run.metrics):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: the run has not finished; finish it with "
                                    f"`orca-lora run {config_file}`")
    if diverged(read_metrics(run)):
        raise ValueError(f"{run.metrics}: non-finite errors, the run diverged; leave it out or re-run it "
                         "with a lower stage3.lr")
    return config


def read_run(directory: Path, label: str, config: Config, frozen: FrozenWeights) -> RunWeights:
    """Every adapted module's weight change (and A matrix, for adapter runs) from a finished run."""
    run = RunFiles(directory)
    method, trainable = config.stage3.method, run.trainable
    ranks = tested_ranks(run)
    state = load_file(str(trainable))
    rule = get_method(method).weight_change
    changes, lora_A = {}, {}
    for module in ranks:
        prefix = f"{MODEL_PREFIX}{module}."
        params = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        missing = [f"{prefix}{name}" for name in rule.needs if name not in params]
        if missing:
            raise KeyError(f"{trainable} has no {missing[0]!r}, which stage3.method={method!r} in config.yaml "
                           "saves; the file is from another run or method, so re-run stage 3")
        shape = _trained_shape(params)
        changes[module] = rule.compute(params, partial(frozen.weight, config, module, shape), config.stage3)
        if "lora_A" in params:
            lora_A[module] = params["lora_A"]
    return RunWeights(label, directory, method, ranks, changes, lora_A)


def tested_ranks(run: RunFiles) -> dict[str, int]:
    """module -> the rank of the adapter tested, whose tensors trainable.safetensors holds: ibp-lora's
    posterior ranks (it prunes to them; a module at rank 0 keeps no adapter, so no change, and is left
    out), else the ranks the run trained with (a stage-3 allocation's, else stage 2's)."""
    posterior = read_metrics(run).posterior_ranks
    if posterior is not None:
        return {name: int(rank) for name, rank in posterior.items() if rank > 0}
    return {name: int(rank) for name, rank in read_effective_ranks(run).ranks.items()}


def _trained_shape(params: Mapping[str, Tensor]) -> tuple[int, int]:
    if "weight" in params:
        return tuple(params["weight"].shape)
    return params["lora_B"].shape[0], params["lora_A"].shape[1]


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, numbered where two runs share one."""
    names = [Path(directory).resolve().name for directory in run_dirs]
    return [f"{name}-{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]


@dataclass
class ModuleSpectrum:
    run: str
    method: str
    module: str
    shape: tuple[int, int]  # (d_out, d_in)
    diagnostic: RankDiagnostic


@dataclass
class ModuleSimilarity:
    run_a: str
    run_b: str
    module: str
    phi: Tensor  # (r_a x r_b): phi(A_a, A_b, i, j) at [i-1, j-1]
    d_in: int

    @property
    def chance(self) -> float:
        """phi(r_a, r_b) expected for random subspaces."""
        return random_subspace_similarity(*self.phi.shape, self.d_in)


@dataclass
class AnalysisResult:
    out_dir: Path
    energy_fraction: float
    runs: dict[str, str]  # label -> method
    spectra: list[ModuleSpectrum]
    similarities: list[ModuleSimilarity]
    files: list[Path]


def compare_adapters(first: RunWeights, second: RunWeights) -> list[ModuleSimilarity]:
    """phi between the A matrices of every module the two adapter runs share."""
    shared = [module for module in first.lora_A if module in second.lora_A]
    if not shared:
        raise ValueError(f"runs {first.label} and {second.label} adapt no module in common; compare runs whose "
                         "stage3.targets overlap")
    return [ModuleSimilarity(first.label, second.label, module,
                             subspace_similarity(first.lora_A[module], second.lora_A[module]),
                             first.lora_A[module].shape[1]) for module in shared]


def measure_runs(run_dirs: Sequence[Path], energy_fraction: float
                 ) -> tuple[list[RunWeights], list[ModuleSpectrum], list[ModuleSimilarity]]:
    """Every run's weight changes with their spectra, and phi between every pair of adapter runs."""
    configs = [check_run(directory) for directory in run_dirs]
    frozen = FrozenWeights()
    runs = [read_run(directory, label, config, frozen)
            for directory, label, config in zip(run_dirs, run_labels(run_dirs), configs)]
    spectra = [ModuleSpectrum(run.label, run.method, module, tuple(change.shape),
                              rank_diagnostic(change, run.ranks[module], energy_fraction))
               for run in runs for module, change in run.changes.items()]
    adapters = [run for run in runs if run.lora_A]
    similarities = [similarity for first, second in combinations(adapters, 2)
                    for similarity in compare_adapters(first, second)]
    return runs, spectra, similarities
