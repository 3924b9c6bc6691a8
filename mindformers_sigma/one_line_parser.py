"""argparse for every command line of the project: a bad argument is one line, not a usage block."""

import argparse

from mindformers_sigma.errors import UserError, one_line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


class RaisingParser(OneLineParser):
    """For arguments checked on behalf of another program (the launcher checks the trainer's):
    an error raises :class:`UserError` for the caller to report, instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {one_line(message)}")
