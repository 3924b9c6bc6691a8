"""``pangu-sigma bench dp_scaling``: tokens/s of the tiny config trained by one process against two
data-parallel msrun workers on CPU (``run/distributed_train.sh --cpu``), same global batch.

Throughput is the mean over steps after the first (which compiles).  On a 2-core machine both
workers share the cores one process already uses, so the ratio measures the data-parallel
overhead (gradient all-reduce, two graphs), not a speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_part
from mindformers_sigma.benchmarks.training import QUICK, TINY
from mindformers_sigma.errors import UserError

REPO = Path(__file__).resolve().parents[2]
WORKERS = 2


def _tokens_per_second(out_dir: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    # each record's tokens/s is a moving mean over recent steps; the first step (compile) is left out
    return float(sum(r["tokens_per_second"] for r in records[1:]) / max(1, len(records) - 1))


def _run(command: list, what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable))
    if done.returncode != 0:
        raise UserError(f"bench dp_scaling: {what} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    steps = 4 if quick else 30
    common = ["--steps", str(steps), "--set", "train.peak_flops=1.0e11", "--set", "train.log_interval=1000"]
    for override in QUICK if quick else []:
        common += ["--set", override]
    with tempfile.TemporaryDirectory() as work:
        one, many = os.path.join(work, "one"), os.path.join(work, "many")
        _run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(TINY), "--out", one, *common],
             "one process")
        _run(["bash", str(REPO / "run" / "distributed_train.sh"), "--cpu", "--workers", str(WORKERS), "--log-dir",
              os.path.join(work, "logs"), str(TINY), "--", "--out", many, *common], f"{WORKERS} msrun workers")
        single, parallel = _tokens_per_second(one), _tokens_per_second(many)
    return write_part(out_dir, "dp_scaling", quick, {
        "config": str(TINY), "overrides": QUICK if quick else [], "steps": steps, "workers": WORKERS,
        "single_tokens_per_s": single, "parallel_tokens_per_s": parallel, "ratio": parallel / single})


def table(record: dict) -> str:
    return "\n".join(markdown_table(
        ["tiny config, same global batch", "tokens/s"],
        [["1 process", f"{record['single_tokens_per_s']:,.0f}"],
         [f"{record['workers']} msrun workers (CPU, data parallel)", f"{record['parallel_tokens_per_s']:,.0f}"],
         ["ratio", f"{record['ratio']:.2f}"]]))
