"""`orca-lora` command line: parses arguments, calls the library, prints. No logic lives here."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from orca_lora.choices import PAIRED_TESTS
from orca_lora.config import ConfigError, to_yaml
from orca_lora.config_load import load_config
from orca_lora.errors import INTERRUPTED_EXIT_CODE, RunInterrupted, TrainingDiverged
from orca_lora.logs import configure_logging

Arguments = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, Arguments, Callable[[argparse.Namespace], int]]] = {}


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set stage3.rank=8 (repeatable)")
    parser.add_argument("--defaults", action="store_true",
                        help="accept a config file with no sections (every value its default)")


def directories_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directories", nargs="+", type=Path, metavar="DIR",
                        help="sweep or run directories (searched for finished runs)")


def command(name: str, help_text: str, arguments: Arguments = config_arguments):
    def decorate(function):
        COMMANDS[name] = (help_text, arguments, function)
        return function
    return decorate


def _config(args: argparse.Namespace):
    return load_config(args.config, args.set, allow_empty=args.defaults)


@command("check", "validate a config against the source body's shapes and print it resolved (defaults and "
         "--set applied)")
def check_command(args: argparse.Namespace) -> int:
    config = _config(args)
    import torch

    from orca_lora.preflight import body_architecture, check_against_body

    check_against_body(config, body_architecture(config.source))
    if config.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        # a login node checks the configs of GPU nodes: `run` refuses here, `check` only says so
        print(f"orca-lora check: warning: trainer.accelerator={config.trainer.accelerator} but this machine has "
              "no GPU; `run` needs one", file=sys.stderr)
    print(to_yaml(config), end="")
    return 0


@command("run", "run the pipeline (align, gap and rank, refine) into runs/<name>/")
def run_command(args: argparse.Namespace) -> int:
    config = _config(args)  # a bad value fails before the training stack's imports
    from orca_lora.pipeline import run_pipeline
    from orca_lora.reports.run_plots import plot_run

    result = run_pipeline(config)
    if result.process_rank != 0:  # under DDP the other processes ran stage 3 with rank 0; it reports
        return 0
    plot_run(result.directory)
    metrics = result.metrics
    print(f"\nrun directory: {result.directory}")
    print(f"test error ({metrics.task}, {metrics.method}): {metrics.test_error:.4f}   "
          f"trivial predictor: {metrics.baseline_error:.4f}")
    print(f"trainable parameters: {metrics.trainable_params:,}")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in metrics.stage_seconds.items())
    print(f"stage times: {seconds}   plots: {result.directory / 'plots'}")
    return 0


@command("gap", "run stages 1-2 only and print the per-block gap and rank table")
def gap_command(args: argparse.Namespace) -> int:
    from orca_lora.pipeline import run_pipeline
    from orca_lora.reports.run_plots import plot_run
    from orca_lora.run_files import RunFiles, read_gaps

    config = _config(args)
    result = run_pipeline(config, last_stage=2)
    if result.process_rank != 0:
        return 0
    plot_run(result.directory)
    run = RunFiles(result.directory)
    rows = read_gaps(run)
    if rows is None:
        print("stage2.enabled is false: no gaps measured, every module gets stage3.rank")
        return 0
    print(f"\n{'block':>5}  {'name':<20} {'width':>5} {'gap D_i':>10} {'floor':>9} {'p':>6} "
          f"{'95% interval':>21} {'corrected':>9} {'rank':>5}")
    for row in rows:
        interval = f"[{row.ci_low:.4g}, {row.ci_high:.4g}]"
        print(f"{row.block:>5}  {row.name:<20} {row.width:>5} {row.gap:>10.4g} {row.floor:>9.4g} {row.p_value:>6.3f} "
              f"{interval:>21} {row.corrected:>9.4g} {row.rank:>5}")
    print("corrected = max(gap - floor, 0), 0 where p >= 0.05; the floor is the 95% quantile of the null")
    print(f"\nwritten: {run.gaps}, {run.ranks}")
    return 0


@command("pretrain-source", "pretrain the small offline Swin source body on procedural images")
def pretrain_source_command(args: argparse.Namespace) -> int:
    from orca_lora.models.pretrain import cached_source_body_path

    config = _config(args)
    path, result = cached_source_body_path(config.source.pretrain, config.data_root, config.source.pretrain.seed,
                                           trainer_options={"accelerator": config.trainer.accelerator})
    if result is None:
        print(f"offline source body already built: {path}")
    else:
        print(f"offline source body: {path}")
        print(f"held-out accuracy {result.val_accuracy:.3f} (chance {result.chance_accuracy:.3f}) "
              f"in {result.seconds:.0f} s")
    return 0


def tasks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config whose task settings (sizes, resolution, dials) and data_root apply "
                             "(default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set task.n_test=2000 (repeatable)")
    parser.add_argument("--show", type=Path, default=None, metavar="DIR",
                        help="also write DIR/tasks.png, 8 test samples of every task (regression: and targets)")
    parser.set_defaults(defaults=True)  # the config is optional here: without one, the defaults apply


@command("tasks", "list every registered task: shapes, sizes, metric, trivial baseline (generates what is missing)",
         tasks_arguments)
def tasks_command(args: argparse.Namespace) -> int:
    from orca_lora.data.catalog import catalog, format_catalog, write_task_grid

    config = _config(args)
    print(format_catalog(catalog(config.task, config.data_root)))
    if args.show is not None:
        print(f"\nwritten: {write_task_grid(config.task, config.data_root, args.show)}")
    return 0


def sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file: a base config and a grid (see configs/sweep_quick.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every point (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="points run side by side as separate processes (default 1: one after another here)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one `orca-lora run` line per point instead of running them (a point "
                             "after the points whose run directories it reads)")
    parser.add_argument("--status", action="store_true",
                        help="print where each point stands (finished, running, failed, interrupted, not "
                             "started), read from the run directories; runs nothing")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: this machine (default); slurm: one SLURM job array per dependency level, "
                             "through submitit (README, 'Sweeps on a cluster')")
    slurm = parser.add_argument_group("slurm launcher", "each flag replaces the sweep file's `slurm:` setting")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="per job: minutes, or [days-]hours:minutes[:seconds]")
    slurm.add_argument("--gpus-per-job", type=int)
    slurm.add_argument("--cpus-per-job", type=int)
    slurm.add_argument("--array-parallelism", type=int, help="jobs of one array running at once")
    slurm.add_argument("--max-array-size", type=int,
                       help="the cluster's MaxArraySize (default 1000): a bigger level goes as several arrays")
    slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="any other setting, e.g. cluster=local (rehearse the jobs here) or a submitit "
                            "parameter such as slurm_account=my-lab (repeatable)")


def _slurm_flags(args: argparse.Namespace) -> dict:
    import yaml

    flags = {"partition": args.partition, "time": args.time, "gpus_per_job": args.gpus_per_job,
             "cpus_per_job": args.cpus_per_job, "array_parallelism": args.array_parallelism,
             "max_array_size": args.max_array_size}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--slurm {item!r} is not of the form key=value (e.g. slurm_account=my-lab)")
        flags[key] = yaml.safe_load(value)
    return flags


def _launch(sweep, args: argparse.Namespace):
    """The sweep's result, or None when the points went to SLURM (which runs them later)."""
    if args.launcher == "local":
        from orca_lora.sweeps.sweep import run_sweep

        return run_sweep(sweep, args.workers)
    from orca_lora.sweeps.slurm import SLURM_FOLDER, submit_sweep
    from orca_lora.sweeps.slurm_settings import slurm_settings

    submission = submit_sweep(sweep, slurm_settings(sweep.slurm, _slurm_flags(args)))
    if submission.waited:
        return submission.result
    arrays = ", ".join(f"{job_id} ({len(points)} points)" for job_id, points in submission.arrays)
    print(f"\nsweep {sweep.name}: {len(submission.result.skipped)} finished earlier; submitted "
          f"{sum(len(points) for _, points in submission.arrays)} points as SLURM job(s) {arrays or 'none'}")
    print(f"logs: {sweep.directory / SLURM_FOLDER}/ and each point's run.log; follow them with "
          f"`orca-lora sweep {args.sweep} --status`")
    return None


def _report_sweep(sweep, result) -> int:
    from orca_lora.reports.sweep_plots import plot_sweep
    from orca_lora.reports.tables import table_markdown, write_tables
    from orca_lora.studies.seed_table import read_runs, summarize

    print(f"\nsweep {sweep.name}: {len(result.finished)} run, {len(result.skipped)} finished earlier, "
          f"{len(result.elsewhere)} running elsewhere, {len(result.failed)} failed")
    for name, reason in result.elsewhere.items():
        print(f"  running elsewhere: {name}: {reason}")
    for name, reason in result.failed.items():
        print(f"  failed: {name}: {reason}")
    if len(result.failed) < len(sweep.points):
        rows = summarize(read_runs([sweep.directory]))
        written = write_tables(rows, sweep.directory) + plot_sweep(sweep.directory)
        print("\n" + table_markdown(rows))
        print(f"written: {', '.join(str(path) for path in written if path.suffix != '.pdf')}")
    return 1 if result.failed else 0


@command("sweep", "run every point of a sweep (skipping finished ones), then write its table and plots; or submit "
         "them to SLURM, or show where they stand", sweep_arguments)
def sweep_command(args: argparse.Namespace) -> int:
    from orca_lora.sweeps.stopping import exit_code
    from orca_lora.sweeps.sweep import load_sweep, print_commands

    sweep = load_sweep(args.sweep, args.set, check=not args.status)
    if args.status:
        from orca_lora.sweeps.status import format_status, sweep_status

        print(format_status(sweep, sweep_status(sweep)))
        return 0
    if args.print_commands:
        print("\n".join(print_commands(sweep)))
        return 0
    try:
        result = _launch(sweep, args)
    except RunInterrupted as stopped:  # one line, and the exit code a shell gives the signal
        print(f"orca-lora sweep: {stopped}", file=sys.stderr)
        return exit_code(stopped)
    return 0 if result is None else _report_sweep(sweep, result)


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


@command("report", "the study's Markdown report (DIR/report.md) with its figures, tables and verdict, and "
         "DIR/hypothesis.json", report_arguments)
def report_command(args: argparse.Namespace) -> int:
    from orca_lora.reports.study_report import write_report
    from orca_lora.studies.hypothesis import write_study

    result = _evaluate(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orca-lora",
        description="ORCA-style cross-modal fine-tuning with modality-gap LoRA rank selection.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, function) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        arguments(sub)
        sub.set_defaults(handler=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.handler(args)
    except RunInterrupted as interrupted:
        print(f"orca-lora {args.command}: {interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (ConfigError, OSError, KeyError, ValueError, TrainingDiverged) as error:
        if args.debug:
            raise
        print(f"orca-lora {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2


def _message(error: BaseException) -> object:
    """The one line to print: a failed write named with its path and fix (`files.WriteFailed`) even when a
    later error (Lightning's teardown writing its log to the same full disk) was raised while handling it."""
    from orca_lora.files import FULL, NOT_WRITABLE, WriteFailed, write_failed

    chain = [error]
    while chain[-1].__context__ is not None and len(chain) < 20:
        chain.append(chain[-1].__context__)
    failed = next((link for link in chain if isinstance(link, WriteFailed)), None)
    if failed is None and isinstance(error, OSError) and error.filename and error.errno in FULL + NOT_WRITABLE:
        failed = write_failed(error.filename, error)  # a write outside files.py: the run lock, a folder
    if failed is not None:
        return failed
    return error.args[0] if isinstance(error, KeyError) and error.args else error


if __name__ == "__main__":
    sys.exit(main())
