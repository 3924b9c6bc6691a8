"""Shared fixtures: small configs built from the shipped tiny YAML, and MindSpore set-up."""

from __future__ import annotations

import copy
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
        raw[name].update(values)
    return config_from_dict(copy.deepcopy(raw), source="<test>")


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)
    np.random.seed(0)
    yield
