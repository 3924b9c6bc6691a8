"""Shared fixtures: small configs built from the shipped tiny YAML, and MindSpore set-up."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml

from mindformers_sigma.config import SigmaConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ascend_configs"
TINY_YAML = CONFIGS / "pangu_sigma_tiny_cpu.yaml"


def tiny_raw() -> dict:
    """The tiny CPU config as a plain dict, to be modified by tests."""
    return yaml.safe_load(TINY_YAML.read_text())


def micro_config(**sections) -> SigmaConfig:
    """A very small model for unit tests; ``sections`` update the named YAML sections."""
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48,
                        num_layers=3, dense_layers=1, sparse_layers=2, seq_length=16)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(copy.deepcopy(raw), source="<test>")


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)
    np.random.seed(0)
    yield


EOD = 6
REAL_VOCAB = 512  # micro models that read the real-text corpus need the tokenizer's vocabulary


@pytest.fixture(scope="session")
def real_corpus(tmp_path_factory):
    """A small prepared corpus of real text (Python source, English reference prose, Chinese), packed
    into samples of micro_config()'s length: documents end inside samples, so batches hold EOD."""
    import sysconfig

    from pydoc_data.topics import topics

    from mindformers_sigma.data.dataset import PreparedCorpus
    from mindformers_sigma.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("real_corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "code.txt").write_text((stdlib / "bisect.py").read_text())
    (root / "en.jsonl").write_text("".join(
        json.dumps({"text": topics[name][:600]}) + "\n" for name in sorted(topics)[:40]))
    (root / "zh.jsonl").write_text("".join(
        json.dumps({"text": text}, ensure_ascii=False) + "\n"
        for text in ["迈向充满希望的新世纪", "同胞们、朋友们、女士们、先生们", "在这辞旧迎新的美好时刻", "继续努力"] * 8))
    out = root / "prepared"
    prepare_data([("code", str(root / "code.txt")), ("en", str(root / "en.jsonl")), ("zh", str(root / "zh.jsonl"))],
                 str(out), 16, vocab_size=REAL_VOCAB)
    return PreparedCorpus(str(out)), out


def real_batch(corpus, rows_per_domain=(2, 1, 1), offset=0):
    """Real samples (an uneven domain mix by default) whose inputs contain an end of document where
    the domain has such samples, and their domain ids."""
    tokens, domains = [], []
    for domain, count in enumerate(rows_per_domain):
        samples = corpus.samples[domain]
        with_eod = [row for row in samples if (row[:-1] == EOD).any()] or list(samples)
        for i in range(count):
            tokens.append(with_eod[(offset + i) % len(with_eod)])
            domains.append(domain)
    return np.stack(tokens).astype(np.int32), np.asarray(domains, np.int32)


def assert_close_to_scale(actual, expected, rel, what=""):
    """|actual - expected| <= rel * scale, where scale is the largest |expected| of the tensor or of
    all tensors together (rounding in a sum is relative to its terms, not to a sum that cancels)."""
    overall = max(float(np.abs(e).max()) for e in expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        tolerance = rel * (float(np.abs(e).max()) + overall * 0.1)
        diff = float(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64)).max())
        assert diff <= tolerance, f"{what}[{index}]: max |diff| {diff:.3g} > {tolerance:.3g}"


def train_cmd(config, out, *extra):
    return [sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config), "--out", str(out), *extra]


def stop_after_checkpoint(config, out, at_least, extra=(), sig=signal.SIGKILL):
    """Start a run, send ``sig`` once checkpoint ``at_least`` exists; returns (newest step, exit code, stderr)."""
    from mindformers_sigma.checkpoint import files as ckpt

    process = subprocess.Popen(train_cmd(config, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and ckpt.list_checkpoints(str(out / "checkpoints"))[-1:] < [at_least]:
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return ckpt.list_checkpoints(str(out / "checkpoints"))[-1], process.returncode, stderr


def lifecycle_config(prepared, **sections):
    """The micro model with one expert group per real-corpus domain (code, en, zh), fed by ``prepared``."""
    values = {"model": {"vocab_size": REAL_VOCAB},
              "moe": {"num_domains": 3, "num_experts": 6, "experts_per_domain": 2},
              "data": {"source": "mindrecord", "path": str(prepared)},
              "train": {"batch_size": 8, "steps": 60, "warmup_steps": 5, "learning_rate": 3e-3,
                        "min_learning_rate": 3e-4, "checkpoint_interval": 1000, "peak_flops": 1e11,
                        "log_interval": 1000}}
    for name, update in sections.items():
        values.setdefault(name, {}).update(update)
    return micro_config(**values)


@pytest.fixture(scope="session")
def trained_sigma(real_corpus, tmp_path_factory):
    """(config, prepared folder, checkpoint path) of the micro PanGu-Σ after 60 real training steps on the
    three-domain real corpus: the model the lifecycle and generation tests start from."""
    from mindformers_sigma.training.trainer import train

    _, prepared = real_corpus
    config = lifecycle_config(prepared)
    summary = train(config, out_dir=str(tmp_path_factory.mktemp("trained_sigma")), log=lambda line: None)
    assert summary.final_loss < summary.first_loss - 1.0  # it learned something: not a model at initialisation
    return config, prepared, summary.checkpoint
