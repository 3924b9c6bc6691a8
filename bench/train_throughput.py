"""Training throughput of a config in GRAPH_MODE on this machine; writes a JSON record.

Usage: python bench/train_throughput.py --config ascend_configs/pangu_sigma_tiny_cpu.yaml \
           --steps 30 --out bench/results/train_throughput_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile

from mindformers_sigma.config import load_config
from mindformers_sigma.training.trainer import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    summary = train(config, steps=args.steps, log=lambda line: print(line, file=sys.stderr))
    record = {
        "benchmark": "train_throughput",
        "config": args.config,
        "mode": config.context.mode,
        "router": config.moe.router,
        "batch_size": config.train.batch_size,
        "seq_length": config.model.seq_length,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **dataclasses.asdict(summary),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.out)), delete=False) as tmp:
        json.dump(record, tmp, indent=2)
    os.replace(tmp.name, args.out)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
