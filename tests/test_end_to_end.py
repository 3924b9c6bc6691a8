"""End to end on the real demo corpus: download/cache, prepare-data, train; the loss must fall."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from mindformers_sigma.config import load_config
from mindformers_sigma.data.demo_corpus import build_demo_corpus
from mindformers_sigma.data.prepare import prepare_data
from mindformers_sigma.training.trainer import train

from conftest import TINY_YAML


@pytest.mark.slow
def test_tiny_model_learns_the_demo_corpus(tmp_path):
    raw = tmp_path / "raw"
    written = build_demo_corpus(str(raw), log=lambda line: None)
    assert len(written) >= 3, f"demo sources unavailable: only {sorted(written)}"
    domains = [(os.path.basename(f)[:-6], f) for f in sorted(glob.glob(str(raw / "*.jsonl")))]
    config = load_config(TINY_YAML)
    prepare_data(domains, str(tmp_path / "prepared"), config.model.seq_length, vocab_size=config.model.vocab_size)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, source="mindrecord",
                                                                  path=str(tmp_path / "prepared")))
    summary = train(config, steps=60, log=lambda line: None)
    assert summary.dropped_assignments == 0
    assert summary.final_loss < summary.first_loss - 1.0
