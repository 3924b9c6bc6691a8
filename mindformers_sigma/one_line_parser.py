"""argparse for every command line of the project: a bad argument is one line, not a usage block."""

import argparse

from mindformers_sigma.errors import one_line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")
