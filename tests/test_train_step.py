"""One optimizer step lowers the loss, and GRAPH_MODE and PyNative agree."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindformers_sigma.training.lr_schedule import learning_rate_at
from mindformers_sigma.training.optimizer import takes_weight_decay
from mindformers_sigma.training.trainer import build_train_step

from conftest import micro_config


def _two_steps(mode, router, recompute=False):
    ms.set_context(mode=mode)
    ms.set_device("CPU")
    ms.set_seed(0)
    config = micro_config(moe={"router": router}, train={"learning_rate": 1.0e-2, "warmup_steps": 0, "steps": 2},
                          parallel={"recompute": recompute})
    step = build_train_step(config, None, data_parallel=1)
    rng = np.random.default_rng(0)
    tokens = Tensor(rng.integers(0, config.model.vocab_size, (4, config.model.seq_length + 1)).astype(np.int32))
    domains = Tensor(np.array([0, 1, 2, 3], np.int32))
    first = float(step(tokens, domains)[0].asnumpy())
    second = float(step(tokens, domains)[0].asnumpy())
    return first, second


@pytest.mark.parametrize("router", ["rre", "gshard"])
def test_step_lowers_loss_and_modes_agree(router):
    graph = _two_steps(ms.GRAPH_MODE, router)
    pynative = _two_steps(ms.PYNATIVE_MODE, router)
    assert graph[1] < graph[0]
    assert pynative[1] < pynative[0]
    np.testing.assert_allclose(graph, pynative, atol=1e-5)


def test_recompute_changes_memory_not_numbers():
    np.testing.assert_allclose(_two_steps(ms.GRAPH_MODE, "rre", recompute=True), _two_steps(ms.GRAPH_MODE, "rre"),
                               atol=1e-6)


def test_no_weight_decay_on_layernorm_bias_or_table():
    assert takes_weight_decay("backbone.layers.0.attention.query.weight")
    assert takes_weight_decay("backbone.embedding.word.embedding_table")
    for name in ("backbone.layers.0.attention_norm.gamma", "backbone.final_norm.beta",
                 "backbone.layers.0.attention.query.bias", "backbone.layers.1.ffn.experts.b1"):
        assert not takes_weight_decay(name)


def test_warmup_then_cosine_closed_form():
    train = micro_config(train={"learning_rate": 1.0e-3, "min_learning_rate": 1.0e-4,
                                "warmup_steps": 10, "steps": 110}).train
    assert learning_rate_at(0, train) == pytest.approx(1e-4)
    assert learning_rate_at(9, train) == pytest.approx(1e-3)
    for step in (10, 35, 60, 85, 109):
        expected = 1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * (step - 10) / 100))
        assert learning_rate_at(step, train) == pytest.approx(expected)
