"""The full decoder: causality, EOD reset, tied head, and parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from mindformers_sigma.config import load_config
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM
from mindformers_sigma.params import count_parameters

from conftest import CONFIGS, EOD, REAL_VOCAB, micro_config, real_batch
from reference import pangu_sigma_logits, per_domain_nll


def _logits(net, tokens, domains):
    return net.logits(Tensor(np.asarray(tokens, np.int32)), Tensor(np.asarray(domains, np.int32)))[0].asnumpy()


@pytest.mark.parametrize("router", ["rre", "gshard"])
def test_changing_token_t_changes_nothing_before_t(pynative, router):
    config = micro_config(moe={"router": router})
    net = PanGuSigmaForCausalLM(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(7, config.model.vocab_size, (2, 16))
    before = _logits(net, tokens, [0, 3])
    for t in (0, 5, 15):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1 - 7) % (config.model.vocab_size - 7) + 7
        after = _logits(net, changed, [0, 3])
        np.testing.assert_array_equal(after[:, :t], before[:, :t])
        assert np.abs(after[:, t:] - before[:, t:]).max() > 1e-4  # it does change what follows


@pytest.mark.parametrize("router", ["rre", "switch"])
def test_packed_sample_equals_documents_run_separately(pynative, router):
    config = micro_config(moe={"router": router})
    net = PanGuSigmaForCausalLM(config)
    rng = np.random.default_rng(1)
    doc_a = list(rng.integers(7, 64, 5)) + [EOD]
    doc_b = list(rng.integers(7, 64, 6)) + [EOD]
    doc_c = list(rng.integers(7, 64, 3))
    packed = _logits(net, [doc_a + doc_b + doc_c], [2])[0]
    start = 0
    for doc in (doc_a, doc_b, doc_c):
        alone = _logits(net, [doc], [2])[0]
        np.testing.assert_allclose(packed[start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
        start += len(doc)
    # Without the reset the second document would see the first: check the test can tell.
    shifted = _logits(net, [[9] * 6 + doc_b], [2])[0]
    assert np.abs(shifted[6:] - packed[6:13]).max() > 1e-4


def test_output_head_is_tied_to_word_embedding(pynative):
    config = micro_config()
    net = PanGuSigmaForCausalLM(config)
    names = [p.name for p in net.trainable_params()]
    assert sum("embedding.word" in n for n in names) == 1
    assert not any("head" in n for n in names)


@pytest.mark.parametrize("router", ["rre", "switch", "gshard"])
def test_parameter_count_matches_built_model(pynative, router):
    config = micro_config(moe={"router": router})
    net = PanGuSigmaForCausalLM(config)
    built = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    count = count_parameters(config)
    assert count.total == built
    expert_size = sum(int(np.prod(p.shape)) for p in net.trainable_params() if ".experts." in p.name)
    assert count.one_expert * config.moe.num_experts * config.model.sparse_layers == expert_size


def test_tiny_config_count_matches_built_model(pynative):
    config = load_config(CONFIGS / "pangu_sigma_tiny_cpu.yaml")
    net = PanGuSigmaForCausalLM(config)
    assert count_parameters(config).total == sum(int(np.prod(p.shape)) for p in net.trainable_params())
    tables = [p for p in net.get_parameters() if p.name.endswith("routing_table")]
    assert sum(int(np.prod(t.shape)) for t in tables) == count_parameters(config).routing_table_entries


def test_published_model_sizes():
    sigma = count_parameters(load_config(CONFIGS / "pangu_sigma_1085b_512p.yaml"))
    assert abs(sigma.total - 1.085e12) <= 0.005 * 1.085e12
    assert abs(sigma.domain_submodel - 38e9) <= 0.05 * 38e9
    alpha = count_parameters(load_config(CONFIGS / "pangu_alpha_13b.yaml"))
    assert abs(alpha.total - 13.1e9) <= 0.03 * 13.1e9
    # One token activates one expert per sparse layer: as many parameters as the dense model.
    assert sigma.activated_per_token == alpha.total


def _random_weights(net, seed=0):
    """Give every weight (LayerNorm gains, biases, expert biases included) a distinct random value,
    so that no part of the model can be skipped or swapped without changing the output."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        if param.name.endswith("routing_table"):
            continue
        base = 1.0 if param.name.endswith("gamma") else 0.0
        param.set_data(Tensor((base + 0.1 * rng.standard_normal(param.shape)).astype(np.float32)))
    return {param.name: param.asnumpy() for param in net.get_parameters()}


def test_logits_match_an_independent_numpy_forward_of_the_whole_model(pynative, real_corpus):
    corpus, _ = real_corpus
    config = micro_config(model={"vocab_size": REAL_VOCAB})
    net = PanGuSigmaForCausalLM(config)
    params = _random_weights(net)
    tokens, domains = real_batch(corpus, rows_per_domain=(1, 2, 1), offset=2)
    inputs = tokens[:, :-1]
    assert (inputs == EOD).any(axis=1).sum() >= 2, "documents must end inside the batch"
    got = _logits(net, inputs, domains)
    want = pangu_sigma_logits(params, inputs, domains, config.model.num_layers, config.model.num_heads, EOD,
                              config.model.layernorm_epsilon)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)  # float32 against float64


def test_per_domain_nll_and_token_counts_skip_eod_inputs(pynative, real_corpus):
    corpus, _ = real_corpus
    config = micro_config(model={"vocab_size": REAL_VOCAB})
    net = PanGuSigmaForCausalLM(config)
    _random_weights(net, seed=1)
    tokens, domains = real_batch(corpus, rows_per_domain=(2, 0, 2), offset=4)  # domain 1 absent
    assert (tokens[:, :-1] == EOD).sum() >= 2
    nll, counted, _, _ = (o.asnumpy() for o in net(Tensor(tokens), Tensor(domains)))
    logits = _logits(net, tokens[:, :-1], domains).astype(np.float64)
    want_nll, want_counted = per_domain_nll(logits, tokens, domains, config.moe.num_domains, EOD)
    np.testing.assert_array_equal(counted, want_counted)
    assert counted[1] == 0 and counted.sum() == (tokens[:, :-1] != EOD).sum()
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5)


def test_fast_gelu_composition_equals_the_fast_gelu_kernel_forward_and_backward(pynative):
    # The model uses x * sigmoid(1.702 x) because it is ~5x faster on CPU than ops.fast_gelu
    # (pangu-sigma bench kernels); both must give the same values and gradients, also where sigmoid saturates.
    import mindspore as ms
    from mindspore import ops

    from mindformers_sigma.activations import fast_gelu

    rng = np.random.default_rng(0)
    x = Tensor(np.concatenate([np.linspace(-60, 60, 2001), rng.standard_normal(4000) * 3]).astype(np.float32))
    weights = Tensor(rng.standard_normal(x.shape).astype(np.float32))
    ours, kernel = fast_gelu(x).asnumpy(), ops.fast_gelu(x).asnumpy()
    # float32: a few ulps of the output's own size (sigmoid and exp round differently).
    assert np.all(np.abs(ours - kernel) <= 1e-6 * np.maximum(np.abs(kernel), 1.0))
    grad_ours = ms.grad(lambda v: (fast_gelu(v) * weights).sum())(x).asnumpy()
    grad_kernel = ms.grad(lambda v: (ops.fast_gelu(v) * weights).sum())(x).asnumpy()
    assert np.all(np.abs(grad_ours - grad_kernel) <= 1e-5 * np.maximum(np.abs(grad_kernel), 1.0))



@pytest.mark.parametrize("router,slots", [("rre", None), ("switch", None), ("gshard", None), ("rre", 3)])
def test_model_names_are_the_built_models_parameter_names(pynative, router, slots):
    """``model/names.py`` spells the names that checkpoints, layouts, ECSS and the lifecycle commands use;
    each is checked here against the parameters of built models (an ECSS slab model included)."""
    from mindformers_sigma.config import ROUTERS
    from mindformers_sigma.model import names
    from mindformers_sigma.model.layers import LayerNorm, Linear
    from mindformers_sigma.model.pangu_sigma import routing_tables_of
    from mindformers_sigma.moe.experts import BatchedExperts
    from mindformers_sigma.moe.router import ROUTER_CELLS
    from mindformers_sigma.training.optimizer import HybridAdamWeightDecay

    assert set(ROUTER_CELLS) == set(ROUTERS)  # a router has its Cell and its config entry
    config = micro_config(model={"num_layers": 4, "dense_layers": 2}, moe={"router": router})
    net = PanGuSigmaForCausalLM(config, expert_slots=slots)
    params = {p.name: tuple(p.shape) for p in net.get_parameters()}
    m, moe = config.model, config.moe
    layers = names.layer_prefixes(m)
    assert layers == [f"backbone.layers.{i}" for i in range(3)] + ["backbone.top_query_layer"]
    assert {names.layer_of(name) for name in params if ".layers." in name or "top_query_layer." in name} == set(layers)
    assert names.sparse_layer_prefixes(m) == layers[2:]
    for name in (names.WORD_EMBEDDING, names.POSITION_EMBEDDING, names.TOP_QUERY_EMBEDDING,
                 f"{names.FINAL_NORM}.gamma", f"{names.FINAL_NORM}.beta"):
        assert name in params, name
    experts = slots or moe.num_experts
    h, f = m.hidden_size, m.ffn_hidden_size
    for layer in names.sparse_layer_prefixes(m):
        assert [params[name] for name in names.expert_tensor_names(layer)] == \
            [(experts, h, f), (experts, 1, f), (experts, f, h), (experts, 1, h)]
        assert (names.routing_table_name(layer) in params) == (moe.table_routed and slots is None)
        assert (f"{layer}.{names.GATE_WEIGHT}" in params) == moe.learned_gate
    for layer in layers[:2]:
        for dense in names.DENSE_FFN_OF_EXPERT.values():
            assert f"{layer}.{dense}" in params
        for role in names.ATTENTION_LINEARS:
            assert f"{layer}.{names.ATTENTION}.{role}.weight" in params
    owned = {kind: {p.name for _, cell in net.cells_and_names() if isinstance(cell, kind)
                    for p in cell.get_parameters(expand=False)} for kind in (BatchedExperts, LayerNorm, Linear)}
    assert {name for name in params if names.is_expert_parameter(name)} == owned[BatchedExperts]
    biases = {name for name in owned[Linear] if name.endswith(".bias")} | \
        {name for name in owned[BatchedExperts] if name.endswith((".b1", ".b2"))}
    assert {name for name in params if names.is_bias_or_norm(name)} == owned[LayerNorm] | biases
    assert all(names.is_model_parameter(name) for name in params)
    optimizer = HybridAdamWeightDecay(net.trainable_params(), 1e-3, 0.9, 0.95, 1e-8, 1e-8, 0.1)
    moments = {p.name for p in optimizer.moments1} | {p.name for p in optimizer.moments2}
    assert moments == {moment for p in net.trainable_params() for moment in names.moment_names(p.name)}
    assert all(names.is_moment(name) and not names.is_model_parameter(name) for name in moments)
    assert {name for name in moments if names.is_expert_parameter(name)} == \
        {moment for name in owned[BatchedExperts] for moment in names.moment_names(name)}
    tables = routing_tables_of(net)
    assert list(tables) == ([names.routing_table_name(layer) for layer in names.sparse_layer_prefixes(m)]
                            if moe.table_routed else [])
    for name, table in tables.items():
        assert table.shape == (moe.num_domains, m.vocab_size) and table.dtype == np.int32
        if slots is None:
            np.testing.assert_array_equal(table, dict(net.parameters_and_names())[name].asnumpy())
