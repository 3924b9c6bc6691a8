"""argparse for every command line of the project: a bad argument is one line, not a usage block;
and the one shape of a command: a :class:`Command` that a package gives and ``cli.py`` registers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence

from mindformers_sigma.errors import UserError, one_line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


class RaisingParser(OneLineParser):
    """For arguments checked on behalf of another program (the launcher checks the trainer's):
    an error raises :class:`UserError` for the caller to report, instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {one_line(message)}")


@dataclass(frozen=True)
class Command:
    """One command of a command line: its name, one-line help, its options and what it runs (exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str) -> None:
    """Each of ``commands`` as a sub-command of ``parser``: the name given is ``args.<dest>``, and the
    chosen command's ``run`` is ``args.run_<dest>`` (so sub-commands of sub-commands keep theirs apart)."""
    choices = parser.add_subparsers(dest=dest, required=True, parser_class=OneLineParser)
    for command in commands:
        sub = choices.add_parser(command.name, help=command.help.replace("%", "%%"), description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(**{f"run_{dest}": command.run})
