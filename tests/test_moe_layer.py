"""The sparse layer: index dispatch against a per-token numpy loop, routing invariants, gradients."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from mindformers_sigma.model.pangu_sigma import build_routing_tables
from mindformers_sigma.moe.moe_layer import MoELayer
from mindformers_sigma.moe.router import load_balancing_loss
from mindformers_sigma.moe.token_dispatcher import expert_capacity

from conftest import micro_config
from reference import capacity_positions, expert_ffn

BATCH, SEQ = 3, 16


def _layer(pynative, **moe):
    config = micro_config(moe=moe)
    tables = build_routing_tables(config)
    layer = MoELayer(config.model, config.moe, tables[0] if tables else None)
    return config, layer, tables


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((BATCH, SEQ, config.model.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, config.model.vocab_size, (BATCH, SEQ)).astype(np.int32)
    domains = rng.integers(0, config.moe.num_domains, BATCH).astype(np.int32)
    return hidden, tokens, domains


def _experts_numpy(layer):
    experts = layer.experts
    return [p.asnumpy() for p in (experts.w1, experts.b1, experts.w2, experts.b2)]


def _numpy_reference(hidden, choices, gates, weights, capacity):
    """Per-token loop: each (token, choice) inside capacity adds gate * expert(token)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    w1, b1, w2, b2 = weights
    position = capacity_positions(choices, w1.shape[0])
    out = np.zeros_like(flat)
    dropped = 0
    for token in range(flat.shape[0]):
        for choice in range(choices.shape[1]):
            expert = choices[token, choice]
            if position[token, choice] >= capacity:
                dropped += 1
                continue
            out[token] += gates[token, choice] * expert_ffn(flat[token], w1[expert], b1[expert], w2[expert], b2[expert])
    return out.reshape(hidden.shape), dropped


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_rre_index_dispatch_matches_per_token_loop(pynative, capacity_factor):
    config, layer, tables = _layer(pynative, capacity_factor=capacity_factor)
    hidden, tokens, domains = _inputs(config)
    out, aux, dropped = layer(Tensor(hidden), Tensor(tokens), Tensor(domains))
    choices = tables[0][np.repeat(domains, SEQ), tokens.reshape(-1)].reshape(-1, 1)
    capacity = expert_capacity(BATCH * SEQ, config.moe.num_experts, capacity_factor)
    expected, expected_dropped = _numpy_reference(hidden, choices, np.ones_like(choices, np.float32),
                                                  _experts_numpy(layer), capacity)
    np.testing.assert_allclose(out.asnumpy(), expected, atol=1e-5, rtol=1e-5)
    assert int(dropped.asnumpy()) == expected_dropped
    assert float(aux.asnumpy()) == 0.0
    if capacity_factor == 0.5:
        assert expected_dropped > 0  # the capped case really drops, and the count says how many
    if capacity_factor is None:
        assert expected_dropped == 0


@pytest.mark.parametrize("router,capacity_factor", [("switch", None), ("gshard", None), ("gshard", 1.0)])
def test_learned_router_dispatch_matches_per_token_loop(pynative, router, capacity_factor):
    config, layer, _ = _layer(pynative, router=router, capacity_factor=capacity_factor)
    hidden, tokens, domains = _inputs(config, seed=1)
    out, aux, dropped = layer(Tensor(hidden), Tensor(tokens), Tensor(domains))
    logits = hidden.reshape(-1, hidden.shape[-1]) @ layer.router.weight.asnumpy()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top_k = config.moe.top_k
    choices = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    gates = np.take_along_axis(probs, choices, -1)
    if top_k > 1:
        gates = gates / gates.sum(-1, keepdims=True)
    capacity = expert_capacity(BATCH * SEQ * top_k, config.moe.num_experts, capacity_factor)
    expected, expected_dropped = _numpy_reference(hidden, choices, gates, _experts_numpy(layer), capacity)
    np.testing.assert_allclose(out.asnumpy(), expected, atol=1e-5, rtol=1e-4)
    assert int(dropped.asnumpy()) == expected_dropped
    num_experts = config.moe.num_experts
    share = np.bincount(choices[:, 0], minlength=num_experts) / choices.shape[0]
    np.testing.assert_allclose(float(aux.asnumpy()), num_experts * (share * probs.mean(0)).sum(), rtol=1e-5)


def test_same_domain_and_token_always_goes_to_the_same_expert(pynative):
    config, layer, tables = _layer(pynative)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 8, (6, SEQ)).astype(np.int32)  # few distinct tokens: many repeats
    domains = np.array([0, 1, 2, 3, 0, 1], np.int32)
    hidden = rng.standard_normal((6 * SEQ, config.model.hidden_size)).astype(np.float32)
    token_domains = np.repeat(domains, SEQ)
    experts, gates, _ = layer.router(Tensor(hidden), Tensor(tokens.reshape(-1)), Tensor(token_domains))
    experts = experts.asnumpy().reshape(-1)
    seen = {}
    for domain, token, expert in zip(token_domains, tokens.reshape(-1), experts):
        assert seen.setdefault((domain, token), expert) == expert
        per_domain = config.moe.experts_per_domain
        assert domain * per_domain <= expert < (domain + 1) * per_domain
    np.testing.assert_array_equal(experts, tables[0][token_domains, tokens.reshape(-1)])
    assert np.all(gates.asnumpy() == 1.0)
    # The table is a non-trainable parameter, so it travels with checkpoints.
    assert not layer.router.routing_table.requires_grad
    assert "routing_table" in [p.name.rsplit(".", 1)[-1] for p in layer.get_parameters()]


class _SumOutput(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, hidden, tokens, domains):
        return self.layer(hidden, tokens, domains)[0].sum()


def test_domain_tokens_give_zero_gradient_outside_their_group(pynative):
    config, layer, _ = _layer(pynative)
    hidden, tokens, _ = _inputs(config)
    domain = 2
    domains = np.full(BATCH, domain, np.int32)
    weights = layer.experts.trainable_params()
    grads = ops.GradOperation(get_by_list=True)(_SumOutput(layer), ms.ParameterTuple(weights))(
        Tensor(hidden), Tensor(tokens), Tensor(domains))
    per_domain = config.moe.experts_per_domain
    group = slice(domain * per_domain, (domain + 1) * per_domain)
    for param, grad in zip(weights, grads):
        grad = grad.asnumpy()
        outside = np.delete(grad, np.arange(group.start, group.stop), axis=0)
        assert np.all(outside == 0.0), param.name
        assert np.abs(grad[group]).sum() > 0, param.name


def test_auxiliary_loss_is_higher_for_skewed_routing():
    num_tokens, num_experts = 64, 8
    balanced = np.full((num_tokens, num_experts), 1.0 / num_experts, np.float32)
    balanced_first = np.arange(num_tokens) % num_experts
    skewed = np.full((num_tokens, num_experts), 0.02, np.float32)
    skewed[:, 0] = 1.0 - 0.02 * (num_experts - 1)
    skewed_first = np.zeros(num_tokens)
    low = float(load_balancing_loss(Tensor(balanced), Tensor(balanced_first, ms.int32), num_experts).asnumpy())
    high = float(load_balancing_loss(Tensor(skewed), Tensor(skewed_first, ms.int32), num_experts).asnumpy())
    assert math.isclose(low, 1.0, rel_tol=1e-6)  # E * sum(1/E * 1/E) for perfect balance
    assert math.isclose(high, num_experts * skewed[0, 0], rel_tol=1e-5)
    assert high > 5 * low


def test_host_planned_capacity_is_exact_and_smaller(pynative):
    from mindformers_sigma.moe.capacity_planner import ExpertCapacityPlanner, routing_tables_of

    config, layer, tables = _layer(pynative)
    hidden, tokens, domains = _inputs(config, seed=3)
    planner = ExpertCapacityPlanner(routing_tables_of(layer), config.moe.num_experts)
    assert [t.tolist() for t in planner.tables] == [tables[0].tolist()]
    loads = np.bincount(tables[0][np.repeat(domains, SEQ), tokens.reshape(-1)], minlength=config.moe.num_experts)
    assert planner.busiest_expert_load(tokens, domains) == loads.max()
    hint = planner.capacity_hint(tokens, domains)
    assert loads.max() <= hint.shape[0] < BATCH * SEQ  # enough for the busiest expert, smaller than "every token"
    exact, _, dropped_none = layer(Tensor(hidden), Tensor(tokens), Tensor(domains))
    planned, _, dropped = layer(Tensor(hidden), Tensor(tokens), Tensor(domains), Tensor(hint))
    np.testing.assert_allclose(planned.asnumpy(), exact.asnumpy(), atol=1e-6)
    assert int(dropped.asnumpy()) == int(dropped_none.asnumpy()) == 0
    short = np.zeros(int(loads.max()) - 1, np.int32)
    _, _, dropped_short = layer(Tensor(hidden), Tensor(tokens), Tensor(domains), Tensor(short))
    assert int(dropped_short.asnumpy()) == int((loads == loads.max()).sum())  # one token lost per busiest expert


def test_capacity_ladder():
    from mindformers_sigma.moe.capacity_planner import ExpertCapacityPlanner

    planner = ExpertCapacityPlanner([], 16)
    assert [planner.ladder_size(load, 2048) for load in (1, 128, 129, 256, 300, 1500, 2048)] == \
        [128, 128, 256, 256, 512, 2048, 2048]
    assert planner.capacity_hint(np.zeros((2, 4), np.int32), np.zeros(2, np.int32)) is None


def test_data_parallel_ranks_agree_on_capacity(pynative):
    from mindformers_sigma.moe.capacity_planner import ExpertCapacityPlanner

    config, _, tables = _layer(pynative)
    planner = ExpertCapacityPlanner(tables, config.moe.num_experts)
    _, tokens, _ = _inputs(config, seed=4)
    tokens = np.concatenate([tokens[:2], np.full((2, SEQ), 7, np.int32)])  # rank 1: one token, one expert
    domains = np.array([0, 1, 2, 2], np.int32)
    shared = planner.capacity_hint(tokens, domains, shards=2).shape[0]
    per_rank = [planner.capacity_hint(tokens[r * 2:(r + 1) * 2], domains[r * 2:(r + 1) * 2]).shape[0] for r in range(2)]
    assert shared == max(per_rank) and per_rank[0] != per_rank[1]
