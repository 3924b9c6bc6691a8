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


def _uneven_batch(config, seed):
    """An uneven domain mix: domains 1 and 3 absent, domain 0's samples all one token (a hot expert)."""
    _, tokens, _ = _inputs(config, seed)
    tokens = np.concatenate([tokens, np.full((3, SEQ), 7, np.int32)])
    return tokens, np.array([2, 2, 2, 0, 0, 0], np.int32)


def test_expert_plan_places_every_token_once_with_its_expert(pynative):
    from mindformers_sigma.moe.expert_plan import ExpertPlanner, padding_ratio

    config, _, tables = _layer(pynative)
    tokens, domains = _uneven_batch(config, seed=3)
    num_tokens = tokens.size
    plan = ExpertPlanner(tables, config.moe.num_experts).plan(tokens, domains)
    assert plan.dtype == np.int32 and plan.shape[0] == len(tables)
    for table, layer_plan in zip(tables, plan):
        experts = table[np.repeat(domains, SEQ), tokens.reshape(-1)]
        rows = layer_plan[:, 1:]
        placed = rows[rows < num_tokens]
        np.testing.assert_array_equal(np.sort(placed), np.arange(num_tokens))  # each token exactly once
        slot, _ = np.nonzero(rows < num_tokens)
        np.testing.assert_array_equal(layer_plan[slot, 0], experts[rows[rows < num_tokens]])
        used_slots = layer_plan[:, 0][(rows < num_tokens).any(1)]
        assert set(used_slots) == set(experts)  # the experts of absent domains get no slot
        assert np.bincount(used_slots).max() >= 2  # the hot expert fills several slots
        # never more rows than one slot per active expert sized for the busiest would compute
        loads = np.bincount(experts)
        assert rows.size <= len(set(experts)) * (8 * -(-loads.max() // 8) + 16)
    assert padding_ratio(plan, num_tokens) == plan.shape[1] * (plan.shape[2] - 1) / num_tokens


def test_planned_layer_equals_in_graph_dispatch_values_and_gradients(pynative):
    from mindformers_sigma.moe.expert_plan import ExpertPlanner

    config, layer, tables = _layer(pynative)
    hidden, _, _ = _inputs(config, seed=5)
    tokens, domains = _uneven_batch(config, seed=5)
    hidden = np.concatenate([hidden, hidden])
    plan = Tensor(ExpertPlanner(tables, config.moe.num_experts).plan(tokens, domains)[0])
    probe = np.random.default_rng(1).standard_normal(hidden.shape).astype(np.float32)

    class Objective(nn.Cell):
        def __init__(self, with_plan):
            super().__init__()
            self.layer = layer
            self.with_plan = with_plan

        def construct(self, x):
            out, _, _ = self.layer(x, Tensor(tokens), Tensor(domains), plan if self.with_plan else None)
            return (out * Tensor(probe)).sum()

    weights = layer.experts.trainable_params()
    results = []
    for with_plan in (False, True):
        objective = Objective(with_plan)
        value, (input_grad, weight_grads) = ms.value_and_grad(objective, 0, weights)(Tensor(hidden))
        results.append([value.asnumpy(), input_grad.asnumpy()] + [g.asnumpy() for g in weight_grads])
    for in_graph, planned in zip(*results):
        np.testing.assert_allclose(planned, in_graph, rtol=1e-5, atol=1e-6 * np.abs(in_graph).max())
    idle = ~np.isin(np.arange(config.moe.num_experts), tables[0][domains].reshape(-1))
    assert idle.any() and not np.abs(results[1][2][idle]).any()  # experts no token reached get zero gradient
