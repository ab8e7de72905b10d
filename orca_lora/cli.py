"""`orca-lora` command line: parses arguments, calls the library, prints. No logic lives here."""
from __future__ import annotations

import argparse
import logging
import warnings
import sys
from typing import Callable

from orca_lora.config import ConfigError, load_config, to_yaml

COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    def decorate(function):
        COMMANDS[name] = (help_text, function)
        return function
    return decorate


def _config(args: argparse.Namespace):
    return load_config(args.config, args.set)


@command("check", "validate a config and print it resolved (defaults and --set applied)")
def check_command(args: argparse.Namespace) -> int:
    print(to_yaml(_config(args)), end="")
    return 0


@command("run", "run the pipeline (align, gap and rank, refine) into runs/<name>/")
def run_command(args: argparse.Namespace) -> int:
    from orca_lora.pipeline import run_pipeline

    result = run_pipeline(_config(args))
    metrics = result.metrics
    print(f"\nrun directory: {result.directory}")
    print(f"test error ({metrics['task']}, {metrics['method']}): {metrics['test_error']:.4f}   "
          f"trivial predictor: {metrics['baseline_error']:.4f}")
    print(f"trainable parameters: {metrics['trainable_params']:,}")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in metrics["stage_seconds"].items())
    print(f"stage times: {seconds}   plots: {result.directory / 'plots'}")
    return 0


@command("gap", "run stages 1-2 only and print the per-block gap and rank table")
def gap_command(args: argparse.Namespace) -> int:
    from orca_lora.experiments.plots import read_csv
    from orca_lora.pipeline import run_pipeline

    result = run_pipeline(_config(args), last_stage=2)
    gaps = result.directory / "stage2" / "gaps.csv"
    if not gaps.is_file():
        print("stage2.enabled is false: no gaps measured, every module gets stage3.rank")
        return 0
    print(f"\n{'block':>5}  {'name':<22} {'gap D_i':>10} {'rank':>5}")
    for row in read_csv(gaps):
        print(f"{row['block']:>5}  {row['name']:<22} {float(row['gap']):>10.4f} {row['rank']:>5}")
    print(f"\nwritten: {gaps}, {result.directory / 'stage2' / 'ranks.json'}")
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


def configure_logging() -> None:
    """`orca_lora` log lines with a timestamp (grep-able); Lightning keeps its own handler."""
    logger = logging.getLogger("orca_lora")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s orca_lora %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # Lightning 2.6 against torch 2.14 warns about its own use of a deprecated pytree API
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orca-lora",
        description="ORCA-style cross-modal fine-tuning with modality-gap LoRA rank selection.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, function) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="YAML config file (see configs/)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set stage3.rank=8 (repeatable)")
        sub.set_defaults(handler=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.handler(args)
    except (ConfigError, OSError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"orca-lora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
