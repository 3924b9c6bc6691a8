"""The sparse FFN layer: router -> token dispatcher -> batched experts -> combine."""

from __future__ import annotations

from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindformers_sigma.config import MoEConfig, ModelConfig
from mindformers_sigma.distributed.collectives import Sharding, one_hot, place
from mindformers_sigma.dtypes import dtype_of
from mindformers_sigma.moe.experts import BatchedExperts
from mindformers_sigma.moe.router import build_router
from mindformers_sigma.moe.token_dispatcher import TokenDispatcher, gather_planned, scatter_planned


class MoELayer(nn.Cell):
    """Replaces the dense FFN in a sparse layer; returns (output, aux_loss, dropped assignments)."""

    def __init__(self, model: ModelConfig, moe: MoEConfig, routing_table: np.ndarray | None = None,
                 expert_slots: int | None = None, sharding: Sharding = Sharding()):
        """``expert_slots``: hold only that many experts' weights (the ECSS device slab, ``ecss/``);
        the host then loads the active experts into slots and the plans name slots, not experts.
        Such a layer only runs host-planned dispatch, so its routing table stays on the host
        (``host_routing_table``) instead of taking device memory that grows with the domains.

        Under expert parallelism this rank holds experts ``expert_index * E / ep ...`` (split F / mp
        under model parallelism too); the ``ep`` ranks of a block exchange tokens with two summed
        gathers (``distributed/collectives.py``): every token of the block to every rank, and each
        expert's outputs back.  A host plan then names this rank's experts and rows of the block's
        tokens; in-graph dispatch exchanges the capacity-bounded ``[E, C, H]`` buffers."""
        super().__init__()
        self.host_routing_table = None
        if moe.table_routed and expert_slots is not None:
            self.router = None
            self.host_routing_table = np.array(routing_table, dtype=np.int32)
        else:
            self.router = build_router(model, moe, routing_table)
        self.dispatcher = TokenDispatcher(moe.num_experts, moe.top_k, moe.capacity_factor)
        self.expert_parallel = sharding.expert_parallel
        self.expert_index = sharding.expert_index
        self.local_experts = moe.num_experts // sharding.expert_parallel
        self.experts = BatchedExperts(
            expert_slots or self.local_experts, model.hidden_size, model.ffn_hidden_size // sharding.model_parallel,
            model.init_std, dtype_of(model.compute_dtype), reduce=sharding.reduce_from_model(), activation=model.activation
        )
        self.dispatch_exchange = sharding.expert_dispatch()
        self.combine_exchange = sharding.expert_combine()
        self.rank_mask = one_hot(sharding.expert_parallel, sharding.expert_index)
        self.own_experts = Tensor(np.repeat(self.rank_mask.asnumpy(), self.local_experts).reshape((1, -1, 1, 1)))

    def routing_table(self) -> Optional[np.ndarray]:
        """This layer's RRE table (the host's own array in an ECSS layer), None for a learned router."""
        if self.host_routing_table is not None:
            return self.host_routing_table
        table = getattr(self.router, "routing_table", None)
        return None if table is None else table.asnumpy()

    def construct(self, hidden, token_ids, domain_ids, expert_plan=None):
        """hidden [B, S, H], token_ids [B, S], domain_ids [B] -> ([B, S, H], aux_loss, dropped).

        ``expert_plan`` [K, C + 1] (RRE only): this layer's host-made dispatch plan
        (``moe/expert_plan.py``); it replaces the router and the in-graph dispatch.
        """
        batch, seq, width = hidden.shape
        flat = hidden.reshape((batch * seq, width))
        if expert_plan is not None:
            tokens = self._block_tokens(flat)  # the block's tokens, in ep order
            token_rows = expert_plan[:, 1:]
            slot_output = self.experts(gather_planned(tokens, token_rows), expert_plan[:, 0])
            output = self._own_tokens(scatter_planned(slot_output, token_rows, tokens.shape[0]), batch * seq)
            return output.reshape((batch, seq, width)), ops.zeros((), ms.float32), ops.zeros((), ms.int32)
        token_domains = ops.broadcast_to(domain_ids.reshape((batch, 1)), (batch, seq)).reshape((-1,))
        expert_index, gates, aux_loss = self.router(flat, token_ids.reshape((-1,)), token_domains)
        buffers, slots, dropped = self.dispatcher.dispatch(flat, expert_index)
        output = self.dispatcher.combine(self._exchanged_experts(buffers), slots, gates)
        return output.reshape((batch, seq, width)), aux_loss, dropped

    def _block_tokens(self, rows):
        """rows [N, H] -> [ep * N, H]: every rank of the block gets the block's rows (a summed gather)."""
        if self.expert_parallel == 1:
            return self.dispatch_exchange(rows)
        return self.dispatch_exchange(place(rows, self.rank_mask)).reshape((-1, rows.shape[-1]))

    def _own_tokens(self, outputs, count: int):
        """outputs [ep * N, H], this rank's experts' part of the block's rows -> this rank's N rows, summed."""
        if self.expert_parallel == 1:
            return outputs
        return self.combine_exchange(outputs)[self.expert_index * count:(self.expert_index + 1) * count]

    def _exchanged_experts(self, buffers):
        """buffers [E, C, H] of this rank's tokens -> the experts' outputs [E, C, H], each expert computed
        by its owner over the buffers of every rank of the block."""
        if self.expert_parallel == 1:
            return self.experts(self.dispatch_exchange(buffers))
        _, capacity, width = buffers.shape
        first = self.expert_index * self.local_experts
        every = self.dispatch_exchange(place(buffers, self.rank_mask))  # [ep, E, C, H]
        mine = every[:, first:first + self.local_experts]
        computed = self.experts(mine.transpose(1, 0, 2, 3).reshape((self.local_experts, -1, width)))
        computed = computed.reshape((self.local_experts, self.expert_parallel, capacity, width)).transpose(1, 0, 2, 3)
        placed = ops.tile(computed, (1, self.expert_parallel, 1, 1)) * self.own_experts.astype(computed.dtype)
        return self.combine_exchange(placed)[self.expert_index]

    def per_token(self, hidden, token_ids, domain_ids):
        """Like ``construct`` without dispatch buffers: each (token, choice) is computed with its expert's
        weights gathered for it.  Cheaper when a step has fewer tokens than experts (decoding);
        returns only the output [B, S, H] (no loss, nothing dropped)."""
        batch, seq, width = hidden.shape
        flat = hidden.reshape((batch * seq, width))
        token_domains = ops.broadcast_to(domain_ids.reshape((batch, 1)), (batch, seq)).reshape((-1,))
        expert_index, gates, _ = self.router(flat, token_ids.reshape((-1,)), token_domains)
        top_k = expert_index.shape[1]
        rows = ops.tile(flat.expand_dims(1), (1, top_k, 1)).reshape((-1, 1, width))  # token-major (token, choice)
        output = self.experts(rows, expert_index.reshape((-1,))).reshape((batch * seq, top_k, width))
        output = (output * gates.astype(output.dtype).expand_dims(-1)).sum(1)
        return output.reshape((batch, seq, width))

