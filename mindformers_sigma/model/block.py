"""One pre-LayerNorm decoder layer: attention then a dense FFN or an MoE layer."""

from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.dtypes import dtype_of
from mindformers_sigma.model.attention import SelfAttention
from mindformers_sigma.model.feed_forward import FeedForward
from mindformers_sigma.model.layers import LayerNorm
from mindformers_sigma.moe.moe_layer import MoELayer


class DecoderLayer(nn.Cell):
    """``x + attn(ln(x))`` then ``x + ffn(ln(x))``; a sparse layer swaps the FFN for experts.

    In the top query layer (PanGu-α's last layer) the caller passes ``query_hidden``, the
    top-query embedding, which replaces the hidden states as the attention query.
    Returns ``(hidden, aux_loss, dropped)``; dense layers give zeros for the last two.
    """

    def __init__(self, config: SigmaConfig, sparse: bool, routing_table: Optional[np.ndarray] = None):
        super().__init__()
        model = config.model
        dtype = dtype_of(model.compute_dtype)
        self.sparse = sparse
        self.attention_norm = LayerNorm(model.hidden_size, model.layernorm_epsilon)
        self.attention = SelfAttention(model.hidden_size, model.num_heads, model.init_std, model.dropout_rate, dtype)
        self.ffn_norm = LayerNorm(model.hidden_size, model.layernorm_epsilon)
        if sparse:
            self.ffn = MoELayer(model, config.moe, routing_table)
        else:
            self.ffn = FeedForward(model.hidden_size, model.ffn_hidden_size, model.init_std, dtype)
        self.dropout = nn.Dropout(p=model.dropout_rate) if model.dropout_rate > 0 else None

    def _residual(self, hidden, update):
        if self.dropout is not None:
            update = self.dropout(update)
        return hidden + update.astype(hidden.dtype)

    def construct(self, hidden, attention_bias, token_ids, domain_ids, query_hidden=None, capacity_hint=None):
        normed = self.attention_norm(hidden)
        if query_hidden is None:
            attended = self.attention(normed, attention_bias)
        else:
            attended = self.attention(normed, attention_bias, query_hidden)
        hidden = self._residual(hidden, attended)
        normed = self.ffn_norm(hidden)
        if self.sparse:
            update, aux_loss, dropped = self.ffn(normed, token_ids, domain_ids, capacity_hint)
        else:
            update = self.ffn(normed)
            aux_loss = ops.zeros((), ms.float32)
            dropped = ops.zeros((), ms.int32)
        return self._residual(hidden, update), aux_loss, dropped
