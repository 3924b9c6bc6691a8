"""Exact expert buffers for RRE: every expert's load is known on the host before the step.

RRE routing is a pure function of (domain id, token id), so from a batch's tokens and the
routing tables the busiest expert of every sparse layer can be counted before the forward
pass.  Buffers of exactly that size drop nothing and waste little, unlike
``capacity_factor: null`` buffers that hold every token for every expert.  Sizes are rounded
up on a doubling ladder, a pure function of the batch (so resumed runs pick the same sizes),
so that only two or three graph shapes (compilations) ever occur.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
from mindspore import nn

from mindformers_sigma.moe.router import RandomRoutedRouter
from mindformers_sigma.moe.routing_table import expert_loads

GROWTH = 2.0
ALIGN = 8


def routing_tables_of(network: nn.Cell) -> List[np.ndarray]:
    """The RRE tables of a built model, in layer order (empty for learned routers)."""
    return [cell.routing_table.asnumpy() for _, cell in network.cells_and_names()
            if isinstance(cell, RandomRoutedRouter)]


class ExpertCapacityPlanner:
    """Smallest ladder size that holds the busiest expert of every sparse layer for a batch."""

    def __init__(self, routing_tables: List[np.ndarray], num_experts: int):
        self.tables = routing_tables
        self.num_experts = num_experts

    def busiest_expert_load(self, input_ids: np.ndarray, domain_ids: np.ndarray) -> int:
        token_domains = np.repeat(domain_ids, input_ids.shape[1])
        flat = input_ids.reshape(-1)
        return max(int(expert_loads(table, token_domains, flat, self.num_experts).max()) for table in self.tables)

    def ladder_size(self, load: int, num_tokens: int) -> int:
        """First size >= load on ceil(N/E) * 2^k (multiples of 8), never above N."""
        size = math.ceil(num_tokens / self.num_experts)
        while size < load:
            size = math.ceil(size * GROWTH / ALIGN) * ALIGN
        return min(size, num_tokens)

    def capacity_hint(self, input_ids: np.ndarray, domain_ids: np.ndarray, shards: int = 1) -> Optional[np.ndarray]:
        """A zero vector whose length is the capacity for this batch (None without RRE layers).

        With ``shards > 1`` the arrays hold the global batch of all data-parallel ranks, rank
        ``r`` owning the ``r``-th contiguous slice: the size fits the busiest expert of any
        rank, so every rank compiles the same graphs at the same steps instead of waiting for
        each other's compilations.
        """
        if not self.tables:
            return None
        slices = zip(np.split(input_ids, shards), np.split(domain_ids, shards))
        load = max(self.busiest_expert_load(ids, domains) for ids, domains in slices)
        return np.zeros(self.ladder_size(load, input_ids.size // shards), dtype=np.int32)
