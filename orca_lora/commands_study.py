"""`orca-lora` commands that read finished runs: tables, the study's verdict and report, the rank law,
the plant calibration of the known-answer controls, allocation comparisons, plots, weight analyses. No logic
lives here: each parses, calls the library, prints."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orca_lora.choices import PAIRED_TESTS
from orca_lora.commands import command, directories_arguments


@command("table", "the seeds' table (method, rank, trainable params, error; mean +/- std over seeds) as CSV and "
         "Markdown", directories_arguments)
def table_command(args: argparse.Namespace) -> int:
    from orca_lora.reports.tables import table_markdown, write_tables
    from orca_lora.studies.seed_table import read_runs, summarize

    rows = summarize(read_runs(args.directories))
    print(table_markdown(rows))  # before writing: a read-only directory still gets its table printed
    written = write_tables(rows, args.directories[0])
    print(f"written: {written[0]}, {written[1]}")
    return 0


def hypothesis_arguments(parser: argparse.ArgumentParser) -> None:
    directories_arguments(parser)
    parser.add_argument("--resamples", type=int, default=999, help="bootstrap replicates (default 999, the plan's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap, permutation and power draws")
    parser.add_argument("--power-studies", type=int, default=100,
                        help="simulated studies per planted slope in the power check (0 skips it; default 100)")


def _evaluate(args: argparse.Namespace):
    from orca_lora.studies.hypothesis import evaluate_study
    from orca_lora.studies.study_runs import check_plan, read_study

    runs = read_study(args.directories)
    return evaluate_study(runs, args.resamples, args.seed, args.power_studies, check_plan(args.directories, runs))


def _print_study(result) -> None:
    """The verdict, after each planned point of the sweep that did not finish."""
    for point in result.missing:
        print(f"not finished: {point.describe()}")
    print(("\n" if result.missing else "") + result.verdict)


@command("hypothesis", "test 'the rank needed grows with the modality gap' on a finished study (configs/study_gap.md): "
         "r* on validation, the censored fit of log2 r* on log2 D, the verdict; writes DIR/hypothesis.json",
         hypothesis_arguments)
def hypothesis_command(args: argparse.Namespace) -> int:
    from orca_lora.studies.hypothesis import write_study

    result = _evaluate(args)
    _print_study(result)
    print(f"\nwritten: {write_study(result, args.directories[0])}")
    return 0


def report_arguments(parser: argparse.ArgumentParser) -> None:
    hypothesis_arguments(parser)
    parser.add_argument("--wall-time", default=None, help="the study's wall time, printed in the report")
    parser.add_argument("--controls", type=Path, nargs="+", default=[], metavar="CONTROL_DIR",
                        help="known-answer control sweep directories, each analysed on its own and shown beside "
                             "the verdict (configs/controls*.yaml)")


@command("report", "the study's Markdown report (DIR/report.md) with its figures, tables and verdict, and "
         "DIR/hypothesis.json", report_arguments)
def report_command(args: argparse.Namespace) -> int:
    from orca_lora.reports.study_report import write_report
    from orca_lora.studies.control_studies import evaluate_control_studies
    from orca_lora.studies.hypothesis import write_study

    controls = evaluate_control_studies(args.controls, args.resamples, args.seed)  # before the study's slower read
    result = _evaluate(args)
    result.control_studies = controls
    directory = args.directories[0]
    written = [write_report(result, directory, " ".join(sys.argv), args.wall_time), write_study(result, directory)]
    _print_study(result)
    print(f"\nwritten: {', '.join(map(str, written))}")
    return 0


def calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    directories_arguments(parser)
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the law (default: DIR/rank_law.json of the first directory)")


@command("calibrate", "fit the rank law r ~ Poisson(c x^beta) on finished ibp-lora runs; write rank_law.json",
         calibrate_arguments)
def calibrate_command(args: argparse.Namespace) -> int:
    from orca_lora.rank.calibrate import LAW_FILE, calibrate, format_law

    law_file = calibrate(args.directories, args.output)
    print(format_law(law_file))
    print(f"\nwritten: {args.output or args.directories[0] / LAW_FILE}")
    return 0


@command("pilot", "the regime pilot (configs/study_gap.md): per task and setting, on validation, the rank benefit G "
         "with its bootstrap interval, the minimum-of-training check and the cost; writes DIR/pilot.md",
         directories_arguments)
def pilot_command(args: argparse.Namespace) -> int:
    from orca_lora.files import write_text_atomic
    from orca_lora.studies.pilot import pilot_table

    table = pilot_table(args.directories)
    print(table)
    path = args.directories[0] / "pilot.md"
    write_text_atomic(path, table)
    print(f"written: {path}")
    return 0


def calibrate_plants_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a planted-shift sweep file (see configs/controls.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value for every point (repeatable)")
    parser.add_argument("--plane-seeds", type=int, default=16,
                        help="plane seeds tried for the smallest k (default 16)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the dials (default: <sweep dir>/plant_calibration.json)")


@command("calibrate-plants", "set a planted-shift sweep's plant dials on stage 2's own measure, before any training, "
         "so the gap the study fits on grows in proportion to k; prints the sweep file's task axis",
         calibrate_plants_arguments)
def calibrate_plants_command(args: argparse.Namespace) -> int:
    from orca_lora.studies.plant_calibration import calibrate_sweep, format_calibration

    calibration, written = calibrate_sweep(Path(args.sweep), args.set, args.plane_seeds, args.output)
    print(format_calibration(calibration))
    print(f"\nwritten: {written}")
    return 0


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="sweep directory of finished runs (searched below)")
    parser.add_argument("--paired-test", choices=PAIRED_TESTS, default="t",
                        help="paired test over test samples against uniform (default t: the mean difference)")
    parser.add_argument("--method", default="lora",
                        help="the stage-3 method whose allocations are compared (default lora; runs of other "
                             "methods, such as the ibp-lora runs ibp-posterior reads, are skipped)")


@command("compare", "allocations at equal parameter budgets: lr chosen on validation, paired differences against "
         "uniform (Holm-corrected); writes DIR/compare.md, compare.csv and plots", compare_arguments)
def compare_command(args: argparse.Namespace) -> int:
    from orca_lora.reports.compare_plots import plot_compare
    from orca_lora.reports.compare_tables import compare_markdown, write_compare
    from orca_lora.studies.compare import compare_directory

    result = compare_directory(args.directory, args.paired_test, args.method)
    print(compare_markdown(result))  # before writing: a read-only directory still gets its table printed
    written = write_compare(result, args.directory) + plot_compare(result, args.directory)
    print(f"written: {', '.join(str(path) for path in written if path.suffix != '.pdf')}")
    return 0


def plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="a run directory or a sweep directory")


@command("plot", "figures (PNG and PDF) for a run or a sweep directory, under DIR/plots/", plot_arguments)
def plot_command(args: argparse.Namespace) -> int:
    from orca_lora.reports.run_plots import plot_run
    from orca_lora.reports.sweep_plots import plot_sweep
    from orca_lora.run_files import RunFiles

    if not args.directory.is_dir():
        raise FileNotFoundError(f"{args.directory} is not a directory; give a run or sweep directory")
    is_run = RunFiles(args.directory).stage("stage1").is_dir()
    written = plot_run(args.directory) if is_run else plot_sweep(args.directory)
    print("\n".join(str(path) for path in written if path.suffix == ".png"))
    return 0


def analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where tables and figures go (default: RUN/analysis for the first RUN)")
    parser.add_argument("--energy", type=float, default=0.9,
                        help="energy fraction tau of ||E||_F^2 that the minimal rank must hold (default 0.9)")


@command("analyze", "spectra and minimal ranks of the weight changes of runs, and LoRA subspace similarity "
         "between runs", analyze_arguments)
def analyze_command(args: argparse.Namespace) -> int:
    from orca_lora.reports.weight_report import analyze_runs, format_analysis

    result = analyze_runs(args.runs, args.out or args.runs[0] / "analysis", energy_fraction=args.energy)
    print(format_analysis(result))
    return 0
