"""The fixed random token -> expert table of Random Routed Experts (pure numpy, built once).

Routing in RRE is a pure function of (domain id, token id): the domain picks a group of
``experts_per_domain`` experts and this table picks one expert of the group per token.
When token frequencies are known the table is balanced by *frequency* (so a Zipfian stream
does not overload the expert that owns the frequent tokens); uniform random assignment is
only the fallback.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _layer_rng(seed: int, layer: int, domain: int) -> np.random.Generator:
    return np.random.default_rng([seed, layer, domain])


def balanced_assignment(frequency: np.ndarray, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """Assign every token to one of ``num_experts`` so that summed frequency per expert is even.

    Randomised longest-processing-time greedy: tokens in descending frequency, each to a
    random expert among those whose load is within the token's own frequency of the least
    loaded one.  Frequent tokens thus land on light experts (the LPT guarantee, loosened by
    one token), while the long tail is spread at random, so layers drawn with different seeds
    route differently.  Tokens never seen (frequency 0) are dealt evenly by count.
    """
    vocab = frequency.shape[0]
    assignment = np.empty(vocab, dtype=np.int32)
    seen = np.flatnonzero(frequency > 0)
    unseen = np.flatnonzero(frequency <= 0)
    assignment[rng.permutation(unseen)] = np.arange(unseen.shape[0]) % num_experts
    order = seen[np.lexsort((rng.random(seen.shape[0]), -frequency[seen]))]
    loads = [0.0] * num_experts
    picks = rng.random(order.shape[0]).tolist()
    for token, pick, weight in zip(order.tolist(), picks, frequency[order].tolist()):
        ceiling = min(loads) + weight
        candidates = [expert for expert, load in enumerate(loads) if load <= ceiling]
        expert = candidates[int(pick * len(candidates))]
        assignment[token] = expert
        loads[expert] += weight
    return assignment


def uniform_assignment(vocab_size: int, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """Fallback without frequencies: a random permutation of token ids dealt round-robin."""
    assignment = np.empty(vocab_size, dtype=np.int32)
    assignment[rng.permutation(vocab_size)] = np.arange(vocab_size) % num_experts
    return assignment


def build_routing_table(
    vocab_size: int,
    num_domains: int,
    experts_per_domain: int,
    seed: int,
    layer: int,
    token_frequency: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The table of one sparse layer: ``[num_domains, vocab_size]`` of *global* expert ids.

    ``token_frequency`` is ``[vocab_size]`` (shared by all domains) or
    ``[num_domains, vocab_size]`` (one distribution per domain); ``None`` gives the uniform
    fallback.  Entry ``[d, t]`` lies in ``[d * experts_per_domain, (d + 1) * experts_per_domain)``.
    """
    if token_frequency is not None:
        token_frequency = np.asarray(token_frequency, dtype=np.float64)
        if token_frequency.shape == (vocab_size,):
            token_frequency = np.broadcast_to(token_frequency, (num_domains, vocab_size))
        if token_frequency.shape != (num_domains, vocab_size):
            raise ValueError(
                f"token frequency table has shape {token_frequency.shape}; expected ({vocab_size},) "
                f"or ({num_domains}, {vocab_size})"
            )
        if (token_frequency < 0).any() or not np.isfinite(token_frequency).all():
            raise ValueError("token frequency table must hold finite, non-negative counts")
    table = np.empty((num_domains, vocab_size), dtype=np.int32)
    for domain in range(num_domains):
        table[domain] = routing_table_row(vocab_size, experts_per_domain, seed, layer, domain,
                                          None if token_frequency is None else token_frequency[domain])
    return table


def routing_table_row(vocab_size: int, experts_per_domain: int, seed: int, layer: int, domain: int,
                      frequency: Optional[np.ndarray] = None) -> np.ndarray:
    """Domain ``domain``'s row of a layer's table (global expert ids); rows are drawn independently, so a
    domain added later gets the row a table with that many domains would have had."""
    rng = _layer_rng(seed, layer, domain)
    if frequency is None:
        local = uniform_assignment(vocab_size, experts_per_domain, rng)
    else:
        local = balanced_assignment(np.asarray(frequency, dtype=np.float64), experts_per_domain, rng)
    return (domain * experts_per_domain + local).astype(np.int32)


def expert_loads(table: np.ndarray, domain_ids: np.ndarray, token_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """How many of the given (domain, token) pairs each expert receives."""
    return np.bincount(table[domain_ids, token_ids], minlength=num_experts)
