"""Training throughput of a config in GRAPH_MODE on this machine; writes a JSON record.

Usage: python bench/train_throughput.py --config ascend_configs/pangu_sigma_tiny_cpu.yaml \
           --steps 30 --out bench/results/train_throughput_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from record import write_record

from mindformers_sigma.config import apply_overrides, load_config
from mindformers_sigma.training.trainer import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], help="config override SECTION.KEY=VALUE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    summary = train(config, steps=args.steps, log=lambda line: print(line, file=sys.stderr))
    record = {
        "benchmark": "train_throughput",
        "config": args.config,
        "overrides": args.set,
        "mode": config.context.mode,
        "router": config.moe.router,
        "batch_size": config.train.batch_size,
        "seq_length": config.model.seq_length,
        **dataclasses.asdict(summary),
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
