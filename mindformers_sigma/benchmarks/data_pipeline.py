"""The data pipeline: prepare-data tokens/s on the demo corpus, and the input pipeline's share of a training step.

The `data` part of `pangu-sigma bench`.  ``quick``
uses a few standard-library sources instead of the (downloaded) demo corpus and a short training.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import sysconfig
import tempfile
import time
from typing import List, Tuple

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_part

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ascend_configs",
                    "pangu_sigma_tiny_cpu.yaml")


def _quick_sources(work: str) -> List[Tuple[str, str]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return [("code", os.path.join(stdlib, "json")), ("prose", os.path.join(stdlib, "pydoc_data"))]


def measure(work: str, quick: bool, train_steps: int) -> dict:
    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.data.dataset import batches
    from mindformers_sigma.data.demo_corpus import build_demo_corpus
    from mindformers_sigma.data.prepare import prepare_data
    from mindformers_sigma.training.trainer import train
    from mindformers_sigma.training.training_data import open_training_data

    config = load_config(TINY)
    if quick:
        domains, include, vocab = _quick_sources(work), ("*.py",), 1000
        config = apply_overrides(config, ["model.vocab_size=1000"])
    else:
        raw = os.path.join(work, "raw")
        build_demo_corpus(raw, log=lambda line: print(line, file=sys.stderr))
        domains = [(os.path.basename(f)[:-6], f) for f in sorted(glob.glob(os.path.join(raw, "*.jsonl")))]
        include, vocab = (), config.model.vocab_size
    start = time.perf_counter()
    manifest = prepare_data(domains, os.path.join(work, "prepared"), config.model.seq_length, vocab_size=vocab,
                            include=include)
    prepare_seconds = time.perf_counter() - start
    tokens = sum(d["tokens"] for d in manifest["domains"])
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, source="mindrecord", path=os.path.join(work, "prepared")))
    start = time.perf_counter()
    stream = batches(open_training_data(config).source, config.train.batch_size)
    open_seconds = time.perf_counter() - start
    fetches = 50 if quick else 500
    start = time.perf_counter()
    for _ in range(fetches):
        next(stream)
    batch_seconds = (time.perf_counter() - start) / fetches
    summary = train(config, steps=train_steps, log=lambda line: print(line, file=sys.stderr))
    step_seconds = config.train.batch_size * config.model.seq_length / summary.tokens_per_second
    return {
        "corpus": {d["name"]: {"documents": d["documents"], "tokens": d["tokens"], "samples": d["samples"]}
                   for d in manifest["domains"]},
        "prepare_data_seconds": prepare_seconds,
        "prepare_data_tokens_per_second": tokens / prepare_seconds,
        "reader_open_seconds": open_seconds,
        "batch_fetch_seconds": batch_seconds,
        "train_step_seconds": step_seconds,
        "input_share_of_step": batch_seconds / (batch_seconds + step_seconds),
    }


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    with tempfile.TemporaryDirectory() as work:
        figures = measure(work, quick, 3 if quick else 30)
    return write_part(out_dir, "data", quick, figures)


def table(record: dict) -> str:
    return "\n".join(markdown_table(["figure", "value"], [
        ["prepare-data tokens/s (read, tokenizer training, tokenize, pack, write)",
         f"{record['prepare_data_tokens_per_second']:,.0f}"],
        ["batch fetch ms", f"{record['batch_fetch_seconds'] * 1e3:.3f}"],
        ["training step ms (tiny config)", f"{record['train_step_seconds'] * 1e3:.1f}"],
        ["input share of a step", f"{record['input_share_of_step']:.2%}"]]))
