"""The weight analysis' files: update_spectra.csv, subspace_similarity.csv, the phi grids, analysis.json and the figures, and its console summary (`orca-lora analyze`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from orca_lora.files import strict_json_text, write_text_atomic
from orca_lora.models.model import BODY_PREFIX
from orca_lora.reports.figures import save_figure, subplots
from orca_lora.weights.analysis import AnalysisResult, ModuleSimilarity, ModuleSpectrum, RunWeights, measure_runs


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
    runs, spectra, similarities = measure_runs([Path(directory) for directory in run_dirs], energy_fraction)
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
    tables[out_dir / "analysis.json"] = strict_json_text(summary)
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
