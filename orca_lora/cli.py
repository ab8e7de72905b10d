"""`orca-lora` command line: the parser, built from the commands `commands_run` and `commands_study` register,
and every error turned into one line naming its fix (`--debug` shows the traceback)."""
from __future__ import annotations

import argparse
import sys

from orca_lora import commands_run, commands_study  # noqa: F401  (each registers its commands, in this order)
from orca_lora.commands import COMMANDS
from orca_lora.config import ConfigError
from orca_lora.errors import INTERRUPTED_EXIT_CODE, RunInterrupted, TrainingDiverged
from orca_lora.logs import configure_logging


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
