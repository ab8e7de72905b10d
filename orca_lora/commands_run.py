"""`orca-lora` commands that run work: check a config, run the pipeline (or its first two stages), pretrain
the source body, list the tasks, run a sweep. No logic lives here: each parses, calls the library, prints."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orca_lora.commands import command, config_from
from orca_lora.config import ConfigError, to_yaml
from orca_lora.errors import RunInterrupted


@command("check", "validate a config against the source body's shapes and print it resolved (defaults and "
         "--set applied)")
def check_command(args: argparse.Namespace) -> int:
    config = config_from(args)
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
    config = config_from(args)  # a bad value fails before the training stack's imports
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

    config = config_from(args)
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

    config = config_from(args)
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

    config = config_from(args)
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

