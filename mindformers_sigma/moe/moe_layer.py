"""The sparse FFN layer: router -> token dispatcher -> batched experts -> combine."""

from __future__ import annotations

import numpy as np
from mindspore import nn, ops

from mindformers_sigma.config import MoEConfig, ModelConfig
from mindformers_sigma.dtypes import dtype_of
from mindformers_sigma.moe.experts import BatchedExperts
from mindformers_sigma.moe.router import LearnedTopKRouter, RandomRoutedRouter
from mindformers_sigma.moe.token_dispatcher import TokenDispatcher


class MoELayer(nn.Cell):
    """Replaces the dense FFN in a sparse layer; returns (output, aux_loss, dropped assignments)."""

    def __init__(self, model: ModelConfig, moe: MoEConfig, routing_table: np.ndarray | None = None):
        super().__init__()
        if moe.router == "rre":
            if routing_table is None:
                raise ValueError("RRE layer needs its routing table")
            self.router = RandomRoutedRouter(routing_table)
        else:
            self.router = LearnedTopKRouter(model.hidden_size, moe.num_experts, moe.top_k, model.init_std)
        self.dispatcher = TokenDispatcher(moe.num_experts, moe.top_k, moe.capacity_factor)
        self.experts = BatchedExperts(
            moe.num_experts, model.hidden_size, model.ffn_hidden_size, model.init_std, dtype_of(model.compute_dtype)
        )

    def construct(self, hidden, token_ids, domain_ids, capacity_hint=None):
        """hidden [B, S, H], token_ids [B, S], domain_ids [B] -> ([B, S, H], aux_loss, dropped).

        ``capacity_hint``: optional tensor whose length is the expert buffer size (see the dispatcher).
        """
        batch, seq, width = hidden.shape
        flat = hidden.reshape((batch * seq, width))
        token_domains = ops.broadcast_to(domain_ids.reshape((batch, 1)), (batch, seq)).reshape((-1,))
        expert_index, gates, aux_loss = self.router(flat, token_ids.reshape((-1,)), token_domains)
        buffers, slots, dropped = self.dispatcher.dispatch(flat, expert_index, capacity_hint)
        output = self.dispatcher.combine(self.experts(buffers), slots, gates)
        return output.reshape((batch, seq, width)), aux_loss, dropped
