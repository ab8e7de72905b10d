"""The `orca-lora` command registry: each command module registers its subcommands here with `@command`,
and `cli.py` builds the parser from `COMMANDS` (the modules never import cli.py, so nothing imports in a circle)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from orca_lora.config import Config
from orca_lora.config_load import load_config

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


def config_from(args: argparse.Namespace) -> Config:
    """The config of a command taking `config_arguments`: the file, its --set overrides, --defaults."""
    return load_config(args.config, args.set, allow_empty=args.defaults)
