"""Multi-head causal self-attention; the top query layer takes its query from another input."""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.distributed.collectives import Sharding
from mindformers_sigma.model.dropout import SeededDropout
from mindformers_sigma.model.layers import Linear


class SelfAttention(nn.Cell):
    """Scaled dot-product attention with an additive mask bias; softmax always in float32.

    Under model parallelism each rank holds ``num_heads / mp`` heads: Q/K/V are column-parallel
    (its heads' output features), the output projection row-parallel, its partial sums reduced once."""

    def __init__(self, hidden_size: int, num_heads: int, init_std: float, dropout_rate: float, dropout_site: int,
                 compute_dtype=ms.float32, sharding: Sharding = Sharding()):
        super().__init__()
        self.num_heads = num_heads // sharding.model_parallel
        self.head_dim = hidden_size // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.compute_dtype = compute_dtype
        local = self.num_heads * self.head_dim
        self.copy_in = sharding.copy_to_model()
        self.query = Linear(hidden_size, local, init_std, compute_dtype)
        self.key = Linear(hidden_size, local, init_std, compute_dtype)
        self.value = Linear(hidden_size, local, init_std, compute_dtype)
        self.output = Linear(local, hidden_size, init_std, compute_dtype, reduce=sharding.reduce_from_model())
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.mix = ops.BatchMatMul()
        self.softmax = ops.Softmax(-1)
        # split over model-parallel ranks: this rank's heads of the probabilities one process drops from
        split = None if sharding.model_parallel == 1 else (1, sharding.model_index * self.num_heads, num_heads)
        self.dropout = SeededDropout(dropout_rate, dropout_site, split)

    def _split_heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape((batch, seq, self.num_heads, self.head_dim)).transpose(0, 2, 1, 3)

    def project(self, hidden, query_input=None):
        """hidden [B, S, H] -> query, key, value [B, heads, S, head_dim]; ``query_input`` replaces hidden for Q.

        Separate from :meth:`attend` so that a decoding step can write key and value into its cache in between.
        """
        hidden = self.copy_in(hidden)
        query_source = hidden if query_input is None else self.copy_in(query_input)
        return (self._split_heads(self.query(query_source)), self._split_heads(self.key(hidden)),
                self._split_heads(self.value(hidden)))

    def attend(self, query, key, value, attention_bias, dropout_seed=None):
        """query [B, heads, Sq, d], key/value [B, heads, Sk, d], attention_bias [B, 1, Sq, Sk] -> [B, Sq, H]."""
        batch, _, seq, _ = query.shape
        scores = self.scores(query, key).astype(ms.float32) * self.scale + attention_bias
        probs = self.dropout(self.softmax(scores), dropout_seed)
        context = self.mix(probs.astype(self.compute_dtype), value)
        context = context.transpose(0, 2, 1, 3).reshape((batch, seq, self.num_heads * self.head_dim))
        return self.output(context)
