"""prepare-data throughput on the demo corpus, and the input pipeline's share of a training step.

Usage: python bench/data_pipeline.py --out bench/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
import tempfile
import time

from record import write_record

from mindformers_sigma.config import load_config
from mindformers_sigma.data.demo_corpus import build_demo_corpus
from mindformers_sigma.data.prepare import prepare_data
from mindformers_sigma.data.dataset import batches
from mindformers_sigma.training.trainer import train
from mindformers_sigma.training.training_data import open_training_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "ascend_configs", "pangu_sigma_tiny_cpu.yaml")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()
    config = load_config(TINY)
    with tempfile.TemporaryDirectory() as work:
        raw = os.path.join(work, "raw")
        build_demo_corpus(raw, log=lambda line: print(line, file=sys.stderr))
        domains = [(os.path.basename(f)[:-6], f) for f in sorted(glob.glob(os.path.join(raw, "*.jsonl")))]
        start = time.perf_counter()
        manifest = prepare_data(domains, os.path.join(work, "prepared"), config.model.seq_length,
                                vocab_size=config.model.vocab_size)
        prepare_seconds = time.perf_counter() - start
        tokens = sum(d["tokens"] for d in manifest["domains"])

        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, source="mindrecord", path=os.path.join(work, "prepared")))
        start = time.perf_counter()
        stream = batches(open_training_data(config).source, config.train.batch_size)
        open_seconds = time.perf_counter() - start
        fetches = 500
        start = time.perf_counter()
        for _ in range(fetches):
            next(stream)
        batch_seconds = (time.perf_counter() - start) / fetches
        summary = train(config, steps=args.train_steps, log=lambda line: print(line, file=sys.stderr))
        step_seconds = config.train.batch_size * config.model.seq_length / summary.tokens_per_second

    record = {
        "benchmark": "data_pipeline",
        "corpus": {d["name"]: {"documents": d["documents"], "tokens": d["tokens"], "samples": d["samples"]}
                   for d in manifest["domains"]},
        "prepare_data_seconds": prepare_seconds,
        "prepare_data_tokens_per_second": tokens / prepare_seconds,
        "reader_open_seconds": open_seconds,
        "batch_fetch_seconds": batch_seconds,
        "train_step_seconds": step_seconds,
        "input_share_of_step": batch_seconds / (batch_seconds + step_seconds),
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
