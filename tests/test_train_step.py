"""One optimizer step lowers the loss, and GRAPH_MODE and PyNative agree."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindformers_sigma.training.global_batch import predicted_tokens
from mindformers_sigma.training.lr_schedule import learning_rate_at
from mindformers_sigma.training.optimizer import takes_weight_decay
from mindformers_sigma.training.trainer import build_train_step

from conftest import assert_close_to_scale, micro_config


def _setup(mode, router, recompute=False):
    ms.set_context(mode=mode)
    ms.set_device("CPU")
    ms.set_seed(0)
    config = micro_config(moe={"router": router}, train={"learning_rate": 1.0e-2, "warmup_steps": 0, "steps": 2},
                          parallel={"recompute": recompute})
    step = build_train_step(config, None)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (4, config.model.seq_length + 1)).astype(np.int32)
    tokens[:, 7] = config.model.eod_token_id
    total = Tensor(float(predicted_tokens(tokens, config.model.eod_token_id)), ms.float32)
    return step, (Tensor(tokens), Tensor(np.array([0, 1, 2, 3], np.int32)), total)


def _loss_and_gradients(mode, router, recompute=False):
    """The loss and gradients of the initial weights (before any update)."""
    step, (tokens, domains, total) = _setup(mode, router, recompute)
    stats, grads = step.forward_backward(tokens, domains, Tensor(1.0, ms.float32), total)
    return float(stats[0].asnumpy().sum() / total.asnumpy()), [g.asnumpy() for g in grads]


@pytest.mark.parametrize("router", ["rre", "gshard"])
def test_graph_and_pynative_compute_the_same_loss_and_gradients(router):
    graph_loss, graph_grads = _loss_and_gradients(ms.GRAPH_MODE, router)
    pynative_loss, pynative_grads = _loss_and_gradients(ms.PYNATIVE_MODE, router)
    # The same function in two execution modes: equal up to float32 rounding, relative to the terms.
    assert graph_loss == pytest.approx(pynative_loss, rel=2e-5)  # a mean of ~60 float32 terms: <= 60 eps apart
    assert_close_to_scale(graph_grads, pynative_grads, rel=1e-5, what="gradient")


@pytest.mark.parametrize("router", ["rre", "gshard"])
def test_update_lowers_the_loss(router):
    step, inputs = _setup(ms.GRAPH_MODE, router)
    losses = [float(step(*inputs)[0].asnumpy().sum() / inputs[2].asnumpy()) for _ in range(2)]
    assert losses[1] < losses[0]


def test_recompute_changes_memory_not_numbers():
    plain_loss, plain_grads = _loss_and_gradients(ms.GRAPH_MODE, "rre")
    recomputed_loss, recomputed_grads = _loss_and_gradients(ms.GRAPH_MODE, "rre", recompute=True)
    assert recomputed_loss == pytest.approx(plain_loss, rel=2e-5)
    assert_close_to_scale(recomputed_grads, plain_grads, rel=1e-5, what="gradient")


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
