"""Independent numpy references for the model's pieces."""

from __future__ import annotations

import numpy as np


def fast_gelu(x: np.ndarray) -> np.ndarray:
    """FastGeLU as documented by MindSpore: x * sigmoid(1.702 x)."""
    return x / (1.0 + np.exp(-1.702 * x))


def expert_ffn(x: np.ndarray, w1, b1, w2, b2) -> np.ndarray:
    """One expert applied to one token vector."""
    return fast_gelu(x @ w1 + b1.reshape(-1)) @ w2 + b2.reshape(-1)


def capacity_positions(expert_choices: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-token loop: position of each (token, choice) inside its expert, first choices first."""
    num_tokens, top_k = expert_choices.shape
    filled = np.zeros(num_experts, dtype=np.int64)
    position = np.zeros_like(expert_choices)
    for choice in range(top_k):
        for token in range(num_tokens):
            expert = expert_choices[token, choice]
            position[token, choice] = filled[expert]
            filled[expert] += 1
    return position


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def eod_reset(input_ids: np.ndarray, eod: int):
    """(position ids, allowed [B, S, S]) by a per-row loop: a token sees earlier tokens of its document."""
    batch, seq = input_ids.shape
    positions = np.zeros((batch, seq), np.int64)
    allowed = np.zeros((batch, seq, seq), bool)
    for b in range(batch):
        start = 0
        for i in range(seq):
            positions[b, i] = i - start
            allowed[b, i, start:i + 1] = True
            if input_ids[b, i] == eod:
                start = i + 1
    return positions, allowed


def _attention(p: dict, prefix: str, hidden, query_source, allowed, heads: int):
    def project(x, name):
        return x @ p[f"{prefix}.{name}.weight"] + p[f"{prefix}.{name}.bias"]

    batch, seq, width = hidden.shape
    dim = width // heads

    def split(x):
        return x.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3)

    q, k, v = split(project(query_source, "query")), split(project(hidden, "key")), split(project(hidden, "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim)
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, width)
    return project(context, "output")


def _ffn(p: dict, prefix: str, x, token_ids, domain_ids):
    if f"{prefix}.mapping.weight" in p:
        return fast_gelu(x @ p[f"{prefix}.mapping.weight"] + p[f"{prefix}.mapping.bias"]) \
            @ p[f"{prefix}.projection.weight"] + p[f"{prefix}.projection.bias"]
    table = p[f"{prefix}.router.routing_table"]
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            e = table[domain_ids[b], token_ids[b, s]]
            out[b, s] = expert_ffn(x[b, s], p[f"{prefix}.experts.w1"][e], p[f"{prefix}.experts.b1"][e],
                                   p[f"{prefix}.experts.w2"][e], p[f"{prefix}.experts.b2"][e])
    return out


def pangu_sigma_logits(p: dict, input_ids: np.ndarray, domain_ids: np.ndarray, num_layers: int, heads: int,
                       eod: int, eps: float) -> np.ndarray:
    """The whole RRE model in float64 numpy from its named parameters: EOD reset, embeddings, pre-LN
    layers, the final LayerNorm, the top query layer (query from the top-query embedding), tied head."""
    p = {name: value.astype(np.float64) if value.dtype.kind == "f" else value for name, value in p.items()}
    positions, allowed = eod_reset(input_ids, eod)
    x = p["backbone.embedding.word.embedding_table"][input_ids] + \
        p["backbone.embedding.position.embedding_table"][positions]

    def layer(x, prefix, query=None):
        normed = layer_norm(x, p[f"{prefix}.attention_norm.gamma"], p[f"{prefix}.attention_norm.beta"], eps)
        x = x + _attention(p, f"{prefix}.attention", normed, normed if query is None else query, allowed, heads)
        normed = layer_norm(x, p[f"{prefix}.ffn_norm.gamma"], p[f"{prefix}.ffn_norm.beta"], eps)
        return x + _ffn(p, f"{prefix}.ffn", normed, input_ids, domain_ids)

    for index in range(num_layers - 1):
        x = layer(x, f"backbone.layers.{index}")
    x = layer_norm(x, p["backbone.final_norm.gamma"], p["backbone.final_norm.beta"], eps)
    x = layer(x, "backbone.top_query_layer", query=p["backbone.top_query_embedding.embedding_table"][positions])
    return x @ p["backbone.embedding.word.embedding_table"].T


def per_domain_nll(logits: np.ndarray, tokens: np.ndarray, domain_ids: np.ndarray, num_domains: int, eod: int):
    """(summed NLL, predicted tokens) per domain, by a loop over positions whose input is not EOD."""
    nll, counted = np.zeros(num_domains), np.zeros(num_domains)
    for b in range(tokens.shape[0]):
        for s in range(tokens.shape[1] - 1):
            if tokens[b, s] == eod:
                continue
            row = logits[b, s] - logits[b, s].max()
            nll[domain_ids[b]] += np.log(np.exp(row).sum()) - row[tokens[b, s + 1]]
            counted[domain_ids[b]] += 1
    return nll, counted
