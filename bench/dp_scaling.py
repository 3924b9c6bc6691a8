"""Tokens/s of 2-worker CPU data parallel (msrun, run/distributed_train.sh) against 1 process.

Usage: python bench/dp_scaling.py --config ascend_configs/pangu_sigma_tiny_cpu.yaml --steps 30 \
           --out bench/results/dp_scaling.json
Both runs use the same global batch; throughput is the mean over steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from record import write_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens_per_second(out_dir: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    # each record's tokens/s is a moving mean over recent steps; the first step (compile) is left out
    return float(sum(r["tokens_per_second"] for r in records[1:]) / max(1, len(records) - 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    common = ["--steps", str(args.steps), "--set", "train.peak_flops=1.0e11", "--set", "train.log_interval=1000"]
    with tempfile.TemporaryDirectory() as work:
        one, many = os.path.join(work, "one"), os.path.join(work, "many")
        subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", args.config,
                        "--out", one, *common], check=True, cwd=REPO)
        subprocess.run(["bash", os.path.join(REPO, "run", "distributed_train.sh"), "--cpu", "--workers",
                        str(args.workers), "--log-dir", os.path.join(work, "logs"), args.config, "--", "--out", many,
                        *common], check=True, cwd=REPO, env=dict(os.environ, PYTHON=sys.executable))
        single, parallel = _tokens_per_second(one), _tokens_per_second(many)
    record = {"benchmark": "dp_scaling", "config": args.config, "steps": args.steps, "workers": args.workers,
              "single_tokens_per_second": single, "parallel_tokens_per_second": parallel,
              "ratio": parallel / single}
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
