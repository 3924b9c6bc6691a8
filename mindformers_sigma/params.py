"""Parameter counts and training FLOPs per token from the config alone, without allocating a single weight.

The formulas mirror the Cells in ``mindformers_sigma.model`` one for one; a test checks
them against the trainable parameters of a built model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mindformers_sigma.config import SigmaConfig


@dataclass
class ParameterCount:
    total: int
    activated_per_token: int
    domain_submodel: int | None
    embeddings: int
    dense_layer: int
    sparse_layer: int
    one_expert: int
    routing_table_entries: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(config: SigmaConfig) -> ParameterCount:
    """Total trainable parameters, those one token activates, and one domain's sub-model."""
    m, moe = config.model, config.moe
    h, f = m.hidden_size, m.ffn_hidden_size
    layer_norm = 2 * h
    attention = 4 * (h * h + h)
    ffn = h * f + f + f * h + h
    router = h * moe.num_experts if moe.learned_gate else 0  # the gate
    shared_per_layer = 2 * layer_norm + attention
    dense_layer = shared_per_layer + ffn
    sparse_layer = shared_per_layer + router + moe.num_experts * ffn
    embeddings = m.vocab_size * h + 2 * m.seq_length * h  # word, position, top-query
    final_norm = layer_norm

    shared = embeddings + final_norm + m.dense_layers * dense_layer + m.sparse_layers * (shared_per_layer + router)
    total = shared + m.sparse_layers * moe.num_experts * ffn
    activated = shared + m.sparse_layers * moe.top_k * ffn
    domain_submodel = shared + m.sparse_layers * moe.experts_per_domain * ffn if moe.table_routed else None
    table_entries = m.sparse_layers * moe.num_domains * m.vocab_size if moe.table_routed else 0
    return ParameterCount(total, activated, domain_submodel, embeddings, dense_layer, sparse_layer, ffn, table_entries)


def format_count(value: int | None) -> str:
    """Human-readable count: 1.085T, 13.1B, 3.2M."""
    if value is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.4g}{suffix}"
    return str(value)


def flops_per_token(config: SigmaConfig) -> float:
    """Training FLOPs per token: 6 x activated non-embedding parameters + 6 V H (the tied head)
    + 12 L H S (attention scores and mixing)."""
    m = config.model
    count = count_parameters(config)
    non_embedding = count.activated_per_token - count.embeddings
    return 6.0 * non_embedding + 6.0 * m.vocab_size * m.hidden_size + 12.0 * m.num_layers * m.hidden_size * m.seq_length
