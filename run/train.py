"""Thin wrapper for launchers: `python run/train.py ARGS` is `pangu-sigma train ARGS`."""

import sys

from mindformers_sigma.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
