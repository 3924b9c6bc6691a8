"""The `pangu-sigma` command (also `python -m mindformers_sigma`): each package gives its commands
(``one_line_parser.Command``: options and what runs), and this module only registers them."""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

# MindSpore's C++ warnings (graph-compiler notes) drown the progress lines; GLOG_v=2 shows them.
os.environ.setdefault("GLOG_v", "3")

from mindformers_sigma.errors import run_reporting_errors  # noqa: E402
from mindformers_sigma.one_line_parser import OneLineParser, add_commands  # noqa: E402

# modules with COMMANDS, in the order `pangu-sigma --help` lists them; none imports MindSpore at import time
COMMAND_MODULES = ("parallel.command", "training.command", "data.command", "rank_table.cli", "generation.command",
                   "lifecycle.commands", "pangu_alpha.command", "eval.command", "benchmarks.command")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="pangu-sigma", description="PanGu-Σ in MindSpore: train, inspect and plan.")
    commands = [command for module in COMMAND_MODULES
                for command in importlib.import_module(f"mindformers_sigma.{module}").COMMANDS]
    add_commands(parser, commands, "command")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; every failure is one line on stderr (2: bad input, 1: internal error)."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(f"pangu-sigma {args.command}", lambda: args.run_command(args))
