"""Rank analysis of finished runs: weight-change spectra, minimal ranks and LoRA subspace similarity.

For every run, each adapted Linear's weight change E = W_trained - W0 (for plain LoRA the update
s B A itself) gets its singular values, energy rank and best rank-r error, r being the LoRA rank the
run gave the module (for a `full` run, the rank stage 2 chose for it). For every pair of adapter
runs, the A matrices of each module they share are compared by phi(A1, A2, i, j). So
`analyze_runs([lora_a, lora_b])` gives heat maps and both runs' update spectra, `analyze_runs([full])`
the minimal-rank table, and a mix gives each where it applies. The math is in subspace.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator, ScalarFormatter
from safetensors.torch import load_file
from torch import Tensor, nn

from orca_lora.adapters.spec import METHODS, get_method
from orca_lora.config import Config
from orca_lora.config_load import load_config
from orca_lora.reports.figures import save_figure, subplots
from orca_lora.weights.subspace import (random_subspace_similarity, rank_diagnostic, RankDiagnostic,
                                        subspace_similarity)
from orca_lora.files import write_text_atomic
from orca_lora.models.model import BODY_PREFIX
from orca_lora.models.source import load_source_body
from orca_lora.studies.seed_table import diverged
from orca_lora.run_files import RunFiles, read_metrics, read_ranks

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
    config = load_config(config_file)
    if get_method(config.stage3.method).weight_change is None:
        analysed = sorted(name for name, spec in METHODS.items() if spec.weight_change is not None)
        raise ValueError(f"{config_file}: stage3.method={config.stage3.method!r} has no weight change W - W0 "
                         f"to analyse (rules exist for {analysed}); pass runs of those methods")
    for needed in (run.ranks, run.trainable):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: the run has not finished; finish it with "
                                    f"`orca-lora run {config_file}`")
    if run.is_finished() and diverged(read_metrics(run)):
        raise ValueError(f"{run.metrics}: non-finite errors, the run diverged; leave it out or re-run it "
                         "with a lower stage3.lr")
    return config


def read_run(directory: Path, label: str, config: Config, frozen: FrozenWeights) -> RunWeights:
    """Every adapted module's weight change (and A matrix, for adapter runs) from a finished run."""
    run = RunFiles(directory)
    method, trainable = config.stage3.method, run.trainable
    ranks = {name: int(rank) for name, rank in read_ranks(run).ranks.items()}
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


def analyze_runs(run_dirs: Sequence[Path], out_dir: Path, energy_fraction: float = 0.9,
                 max_panels: int = 6) -> AnalysisResult:
    """Spectra of every run's weight changes and phi between every pair of adapter runs, written to `out_dir`.

    Writes update_spectra.csv, subspace_similarity.csv (one row per shared module and pair),
    subspace_<a>__<b>.csv (the full phi grids), analysis.json (runs, tau, singular values) and the
    figures update_spectra_<run> and subspace_<a>__<b> (heat maps of up to `max_panels` modules).
    """
    if not run_dirs:
        raise ValueError("no run directories given; pass one or more runs/<name>/ directories")
    if not 0.0 < energy_fraction <= 1.0:
        raise ValueError(f"energy_fraction must be in (0, 1], got {energy_fraction}")
    if max_panels < 1:
        raise ValueError(f"max_panels must be >= 1, got {max_panels}")
    run_dirs = [Path(directory) for directory in run_dirs]
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
    out_dir = Path(out_dir)
    files = write_tables(runs, spectra, similarities, energy_fraction, out_dir)
    files += write_figures(spectra, similarities, energy_fraction, max_panels, out_dir)
    return AnalysisResult(out_dir, energy_fraction, {run.label: run.method for run in runs}, spectra,
                          similarities, files)


SPECTRUM_COLUMNS = ("run", "method", "module", "d_out", "d_in", "rank", "energy_fraction", "energy_rank",
                    "sigma_1", "rank_error", "relative_rank_error", "energy_at_rank")
SIMILARITY_COLUMNS = ("run_a", "run_b", "module", "rank_a", "rank_b", "d_in", "phi_1_1", "phi_ra_rb", "chance")


def _spectrum_row(spectrum: ModuleSpectrum) -> list:
    d = spectrum.diagnostic
    top = d.singular_values[0] if d.singular_values else 0.0
    return [spectrum.run, spectrum.method, spectrum.module, *spectrum.shape, d.rank, d.energy_fraction,
            d.energy_rank, top, d.rank_error, d.relative_rank_error, d.energy_at_rank]


def _similarity_row(similarity: ModuleSimilarity) -> list:
    phi = similarity.phi
    return [similarity.run_a, similarity.run_b, similarity.module, *phi.shape, similarity.d_in,
            float(phi[0, 0]), float(phi[-1, -1]), similarity.chance]


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = [",".join(header)]
    lines += [",".join(f"{value:.6g}" if isinstance(value, float) else str(value) for value in row) for row in rows]
    return "\n".join(lines) + "\n"


def pair_stem(first: str, second: str) -> str:
    return f"subspace_{first}__{second}"


def write_tables(runs: Sequence[RunWeights], spectra: Sequence[ModuleSpectrum],
                 similarities: Sequence[ModuleSimilarity], energy_fraction: float, out_dir: Path) -> list[Path]:
    tables = {out_dir / "update_spectra.csv": _csv_text(SPECTRUM_COLUMNS, [_spectrum_row(s) for s in spectra])}
    if similarities:
        tables[out_dir / "subspace_similarity.csv"] = _csv_text(SIMILARITY_COLUMNS,
                                                               [_similarity_row(s) for s in similarities])
    for (first, second), group in _by_pair(similarities).items():
        rows = [[s.module, i + 1, j + 1, float(s.phi[i, j])] for s in group
                for i in range(s.phi.shape[0]) for j in range(s.phi.shape[1])]
        tables[out_dir / f"{pair_stem(first, second)}.csv"] = _csv_text(("module", "i", "j", "phi"), rows)
    summary = {
        "energy_fraction": energy_fraction,
        "runs": {run.label: {"directory": str(run.directory), "method": run.method} for run in runs},
        "singular_values": {run.label: {s.module: s.diagnostic.singular_values for s in spectra if s.run == run.label}
                            for run in runs},
    }
    tables[out_dir / "analysis.json"] = json.dumps(summary, indent=2) + "\n"
    for path, text in tables.items():
        write_text_atomic(path, text)
    return list(tables)


def _by_pair(similarities: Sequence[ModuleSimilarity]) -> dict[tuple[str, str], list[ModuleSimilarity]]:
    pairs: dict[tuple[str, str], list[ModuleSimilarity]] = {}
    for similarity in similarities:
        pairs.setdefault((similarity.run_a, similarity.run_b), []).append(similarity)
    return pairs


def write_figures(spectra: Sequence[ModuleSpectrum], similarities: Sequence[ModuleSimilarity],
                  energy_fraction: float, max_panels: int, out_dir: Path) -> list[Path]:
    written = []
    for run in dict.fromkeys(s.run for s in spectra):
        written += plot_update_spectra([s for s in spectra if s.run == run], energy_fraction,
                                       out_dir / f"update_spectra_{run}")
    for (first, second), group in _by_pair(similarities).items():
        written += plot_subspace_similarity(group, max_panels, out_dir / pair_stem(first, second))
    return written


def plot_update_spectra(spectra: Sequence[ModuleSpectrum], energy_fraction: float, stem: Path) -> list[Path]:
    """Cumulative energy of each module's weight change against the number of directions kept."""
    figure, axis = subplots(figsize=(5.5, 3.5))
    colors = colormaps["viridis"](np.linspace(0, 1, len(spectra)))
    for spectrum, color in zip(spectra, colors):
        energy = np.square(spectrum.diagnostic.singular_values)
        cumulative = np.cumsum(energy) / energy.sum() if energy.sum() > 0 else np.ones_like(energy)
        axis.plot(np.arange(1, len(energy) + 1), cumulative, color=color, alpha=0.8)
    axis.axhline(energy_fraction, color="gray", linestyle="--", label=f"tau = {energy_fraction:g}")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.set_xlabel("rank r (directions kept)")
    axis.set_ylabel("share of ||E||_F^2 in the top r")
    axis.set_title(f"{spectra[0].run} ({spectra[0].method}): weight-change spectra")
    bar = figure.colorbar(ScalarMappable(cmap="viridis", norm=Normalize(0, len(spectra) - 1)), ax=axis)
    bar.set_label("module (forward order)")
    axis.legend(loc="lower right")
    return save_figure(figure, stem)


def plot_subspace_similarity(group: Sequence[ModuleSimilarity], max_panels: int, stem: Path) -> list[Path]:
    """phi(i, j) heat maps for up to `max_panels` modules spread over the model's depth."""
    picks = sorted(set(np.linspace(0, len(group) - 1, min(max_panels, len(group))).round().astype(int)))
    columns = min(3, len(picks))
    rows = -(-len(picks) // columns)
    figure, axes = subplots(rows, columns, figsize=(3.2 * columns, 2.9 * rows), squeeze=False,
                            layout="constrained")
    for axis, index in zip(axes.flat, picks):
        similarity = group[index]
        r_a, r_b = similarity.phi.shape
        image = axis.imshow(similarity.phi.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower",
                            extent=(0.5, r_b + 0.5, 0.5, r_a + 0.5), aspect="auto")
        axis.set_title(similarity.module.removeprefix(BODY_PREFIX), fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel(f"j ({similarity.run_b})")
        axis.set_ylabel(f"i ({similarity.run_a})")
    for axis in list(axes.flat)[len(picks):]:
        axis.set_visible(False)
    figure.colorbar(image, ax=axes, label="phi(A_a, A_b, i, j)")
    figure.suptitle(f"LoRA A subspace similarity: {group[0].run_a} vs {group[0].run_b}")
    return save_figure(figure, stem)


def format_analysis(result: AnalysisResult) -> str:
    """Tables for the terminal: minimal ranks per module, then phi per shared module and pair."""
    tau = result.energy_fraction
    lines = [f"weight-change spectra: energy rank holds {tau:g} of ||E||_F^2; "
             "error = sigma_(r+1)/sigma_1, the best rank-r spectral error relative to ||E||_2",
             f"{'run':<16} {'method':<10} {'module':<36} {'shape':>9} {'rank r':>6} {'energy rank':>11} {'error':>7}"]
    for s in result.spectra:
        d = s.diagnostic
        lines.append(f"{s.run:<16} {s.method:<10} {s.module:<36} {'x'.join(map(str, s.shape)):>9} {d.rank:>6} "
                     f"{d.energy_rank:>11} {d.relative_rank_error:>7.3f}")
    if result.similarities:
        lines += ["", "LoRA A subspace similarity phi(A_a, A_b, i, j) (Hu et al. 2021, sec. 7.2); "
                  "chance = max(r_a, r_b) / d_in",
                  f"{'runs':<33} {'module':<36} {'r_a x r_b':>9} {'phi(1,1)':>8} {'phi(r_a,r_b)':>12} {'chance':>7}"]
        for s in result.similarities:
            r_a, r_b = s.phi.shape
            lines.append(f"{s.run_a + ' vs ' + s.run_b:<33} {s.module:<36} {f'{r_a}x{r_b}':>9} "
                         f"{float(s.phi[0, 0]):>8.3f} {float(s.phi[-1, -1]):>12.3f} {s.chance:>7.3f}")
    lines += ["", f"written to {result.out_dir}: {len(result.files)} files"]
    return "\n".join(lines)
