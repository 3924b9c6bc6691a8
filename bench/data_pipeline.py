"""prepare-data throughput on the demo corpus, and the input pipeline's share of a training step.

Usage: python bench/data_pipeline.py --out DIR [--quick]   (the `data` part of `pangu-sigma bench`)
"""

import argparse

from mindformers_sigma.benchmarks.data_pipeline import run, table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (data.json)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(table(run(args.quick, args.out)))
