"""argparse for every command line of the project: a bad argument is one line, not a usage block."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
