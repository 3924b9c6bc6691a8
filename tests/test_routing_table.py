"""The RRE routing table: deterministic, domain-grouped, and balanced by token frequency."""

from __future__ import annotations

import numpy as np
import pytest

from mindformers_sigma.moe.routing_table import build_routing_table, expert_loads

VOCAB = 4096
DOMAINS = 3
PER_DOMAIN = 4
RANK_TO_TOKEN = np.random.default_rng(123).permutation(VOCAB)  # frequent tokens are not the small ids


def zipf_tokens(rng: np.random.Generator, count: int, exponent: float = 1.1) -> np.ndarray:
    """``count`` token ids drawn from Zipf(exponent) truncated to the vocabulary (rank r -> id)."""
    ranks = np.arange(1, VOCAB + 1)
    probs = ranks ** -exponent
    probs /= probs.sum()
    return RANK_TO_TOKEN[rng.choice(VOCAB, size=count, p=probs)]


def test_same_seed_same_table_and_group_ranges():
    first = build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=7, layer=1)
    again = build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=7, layer=1)
    other_layer = build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=7, layer=2)
    np.testing.assert_array_equal(first, again)
    assert (first != other_layer).mean() > 0.5  # layers are routed independently
    for domain in range(DOMAINS):
        assert first[domain].min() == domain * PER_DOMAIN
        assert first[domain].max() == (domain + 1) * PER_DOMAIN - 1


def _max_over_mean(table, tokens, domain):
    loads = expert_loads(table, np.full(tokens.shape, domain), tokens, DOMAINS * PER_DOMAIN)
    group = loads[domain * PER_DOMAIN:(domain + 1) * PER_DOMAIN]
    return group.max() / group.mean()


def test_frequency_balanced_table_keeps_zipf_load_even():
    rng = np.random.default_rng(0)
    corpus = zipf_tokens(rng, 100_000)  # what prepare-data would count
    frequency = np.bincount(corpus, minlength=VOCAB)
    table = build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=3, layer=0, token_frequency=frequency)
    held_out = zipf_tokens(np.random.default_rng(1), 100_000)  # a fresh stream with the same law
    for domain in range(DOMAINS):
        assert _max_over_mean(table, held_out, domain) <= 1.15
    # The uniform fallback on the same stream is clearly worse: the test can fail.
    uniform = build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=3, layer=0)
    assert max(_max_over_mean(uniform, held_out, d) for d in range(DOMAINS)) > 1.15


def test_per_domain_frequencies_are_used_per_domain():
    rng = np.random.default_rng(0)
    frequency = np.stack([np.bincount(zipf_tokens(rng, 50_000), minlength=VOCAB) for _ in range(DOMAINS)])
    table = build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=3, layer=0, token_frequency=frequency)
    for domain in range(DOMAINS):
        loads = np.bincount(table[domain] - domain * PER_DOMAIN, weights=frequency[domain], minlength=PER_DOMAIN)
        assert loads.max() / loads.mean() <= 1.02


def test_bad_frequency_table_is_refused():
    with pytest.raises(ValueError, match="shape"):
        build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=0, layer=0, token_frequency=np.ones(10))
    with pytest.raises(ValueError, match="non-negative"):
        build_routing_table(VOCAB, DOMAINS, PER_DOMAIN, seed=0, layer=0, token_frequency=-np.ones(VOCAB))
