"""Decode tokens/s with the KV cache against full recompute, and the extracted sub-model's size and speed.

Usage: python bench/generate.py [--quick] [--out bench/results]
(the same code as `pangu-sigma bench generate`; see mindformers_sigma/benchmarks/generation.py)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")

from mindformers_sigma.benchmarks.generation import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens: checks that it runs")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    run(args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
