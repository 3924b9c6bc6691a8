"""One pre-LayerNorm decoder layer: attention then a dense FFN or an MoE layer."""

from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.distributed.collectives import Sharding
from mindformers_sigma.dtypes import dtype_of
from mindformers_sigma.model.attention import SelfAttention
from mindformers_sigma.model.dropout import SeededDropout
from mindformers_sigma.model.feed_forward import FeedForward
from mindformers_sigma.model.layers import LayerNorm
from mindformers_sigma.moe.moe_layer import MoELayer

# Dropout sites of one layer: attention probabilities, attention residual, FFN residual.
DROPOUT_SITES_PER_LAYER = 3


class DecoderLayer(nn.Cell):
    """``x + attn(ln(x))`` then ``x + ffn(ln(x))``; a sparse layer swaps the FFN for experts.

    In the top query layer (PanGu-α's last layer) the caller passes ``query_hidden``, the
    top-query embedding, which replaces the hidden states as the attention query.
    Returns ``(hidden, aux_loss, dropped, key, value)``: dense layers give zeros for the loss
    and the drops; ``key``/``value`` [B, heads, Sk, d] are what attention attended over, which
    decoding keeps as its cache.
    """

    def __init__(self, config: SigmaConfig, layer_index: int, sparse: bool, routing_table: Optional[np.ndarray] = None,
                 expert_slots: Optional[int] = None, sharding: Sharding = Sharding()):
        super().__init__()
        model = config.model
        dtype = dtype_of(model.compute_dtype)
        self.sparse = sparse
        first_site = DROPOUT_SITES_PER_LAYER * layer_index + 1  # site 0 is the embedding's
        self.attention_norm = LayerNorm(model.hidden_size, model.layernorm_epsilon)
        self.attention = SelfAttention(model.hidden_size, model.num_heads, model.init_std, model.dropout_rate,
                                       first_site, dtype, sharding)
        self.ffn_norm = LayerNorm(model.hidden_size, model.layernorm_epsilon)
        if sparse:
            self.ffn = MoELayer(model, config.moe, routing_table, expert_slots, sharding)
        else:
            self.ffn = FeedForward(model.hidden_size, model.ffn_hidden_size, model.init_std, dtype, sharding,
                                   model.activation)
        self.attention_dropout = SeededDropout(model.dropout_rate, first_site + 1)
        self.ffn_dropout = SeededDropout(model.dropout_rate, first_site + 2)

    def construct(self, hidden, attention_bias, token_ids, domain_ids, query_hidden=None, expert_plan=None,
                  dropout_seed=None, past_key=None, past_value=None, cache_column=None, per_token_experts=False):
        """``past_key``/``past_value`` [B, heads, S, d] with ``cache_column`` [1, 1, S, 1] bool (one decoding
        step): this step's key and value are written into the cache at that column, and attention runs over
        the cache.  ``per_token_experts``: a sparse layer gathers each token's expert weights instead of
        dispatching (``MoELayer.per_token``), the cheap way for a decoding step's few tokens."""
        query, key, value = self.attention.project(self.attention_norm(hidden), query_hidden)
        if past_key is not None:
            key = ops.where(cache_column, key.astype(past_key.dtype), past_key)
            value = ops.where(cache_column, value.astype(past_value.dtype), past_value)
        attended = self.attention.attend(query, key, value, attention_bias, dropout_seed)
        hidden = hidden + self.attention_dropout(attended, dropout_seed).astype(hidden.dtype)
        normed = self.ffn_norm(hidden)
        aux_loss = ops.zeros((), ms.float32)
        dropped = ops.zeros((), ms.int32)
        if self.sparse and per_token_experts:
            update = self.ffn.per_token(normed, token_ids, domain_ids)
        elif self.sparse:
            update, aux_loss, dropped = self.ffn(normed, token_ids, domain_ids, expert_plan)
        else:
            update = self.ffn(normed)
        return hidden + self.ffn_dropout(update, dropout_seed).astype(hidden.dtype), aux_loss, dropped, key, value
