"""`pangu-sigma bench`: the project's benchmarks on this machine (``suite.py``)."""

from __future__ import annotations

import argparse

from mindformers_sigma.benchmarks.doc_blocks import refresh_docs
from mindformers_sigma.benchmarks.suite import PARTS, run_suite
from mindformers_sigma.errors import UserError
from mindformers_sigma.one_line_parser import Command

ALIASES = {"generate": "generation"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", choices=[*PARTS, *ALIASES], help="one part only (default: all; see --only)")
    parser.add_argument("--only", metavar="PART[,PART...]", help=f"these parts: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small models and few steps (checks it runs, not speed)")
    parser.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    parser.add_argument("--docs", metavar="FILE", action="append", default=[],
                        help="regenerate FILE's <!-- bench:NAME --> blocks from this run (repeatable; e.g. README.md "
                             "and docs/benchmarks.md after a full run into bench/results/suite)")
    parser.add_argument("--record", metavar="BENCH_JSON",
                        help="run nothing: regenerate the --docs blocks from this earlier run's bench.json")


def run(args: argparse.Namespace) -> int:
    if args.name is not None and args.only is not None:
        raise UserError("bench: give a part name or --only, not both")
    if args.record is not None:
        if not args.docs or args.name or args.only or args.quick:
            raise UserError("--record: regenerates documents from a record; give --docs FILE, and no part, --only "
                            "or --quick")
        refresh_docs(args.record, args.docs)
        return 0
    run_suite(args.quick, args.only if args.name is None else ALIASES.get(args.name, args.name), args.out, args.docs)
    return 0


COMMANDS = (Command("bench", "run the project's benchmarks on this machine: OUT/bench.json, bench.md, bench.png "
                             "and each part's OUT/PART.json", add_arguments, run),)
