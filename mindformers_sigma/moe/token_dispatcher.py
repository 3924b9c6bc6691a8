"""Index-based token dispatch: sort tokens by expert, scatter into expert buffers, gather back.

No one-hot dispatch matrices: positions inside each expert come from a stable sort of
``(expert, priority)`` keys, tokens move with ``unsorted_segment_sum`` (a scatter) and
come back with ``gather``.  Shapes are static, so every expert has a buffer of
``capacity`` rows:

* ``capacity_factor = None``: capacity is the number of routed assignments, so no
  token can ever be dropped (exact, at the price of memory and padded compute);
* otherwise ``capacity = ceil(capacity_factor * assignments / num_experts)``; assignments
  past an expert's capacity are dropped (their output is zero, so the residual carries the
  token), and the number dropped is returned so that training reports it;
* or, for RRE, the host has planned the dispatch before the step (``moe/expert_plan.py``):
  :func:`gather_planned` and :func:`scatter_planned` then just move rows by the plan's token
  indices, into slots of the plan's size; nothing is sorted or dropped in the graph.

Priority is first choices before second choices, then token order, as in GShard.
"""

from __future__ import annotations

import math
from typing import Optional

import mindspore as ms
from mindspore import nn, ops


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: Optional[float]) -> int:
    """Rows per expert buffer for a step with ``num_assignments`` (token, choice) pairs."""
    if capacity_factor is None:
        return num_assignments
    return max(1, min(num_assignments, math.ceil(capacity_factor * num_assignments / num_experts)))


class TokenDispatcher(nn.Cell):
    """Moves tokens to ``[num_experts, capacity, H]`` buffers and the expert outputs back."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: Optional[float]):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def dispatch(self, hidden, expert_index):
        """hidden [N, H], expert_index [N, k] -> (buffers [E, C, H], slots [N, k], dropped count)."""
        num_tokens, hidden_size = hidden.shape
        num_assignments = num_tokens * self.top_k
        capacity = expert_capacity(num_assignments, self.num_experts, self.capacity_factor)
        trash_slot = self.num_experts * capacity
        # Choice-major order: all first choices, then all second choices (GShard priority).
        experts = expert_index.transpose(1, 0).reshape((-1,)).astype(ms.int32)
        assignment = ops.arange(num_assignments, dtype=ms.int32)
        _, order = ops.sort(experts * num_assignments + assignment)
        rank = ops.tensor_scatter_update(
            ops.zeros((num_assignments,), ms.int32), order.astype(ms.int32).reshape((-1, 1)), assignment
        )
        counts = ops.unsorted_segment_sum(ops.ones((num_assignments,), ms.int32), experts, self.num_experts)
        first_rank = ops.cumsum(counts, 0) - counts
        position = rank - ops.gather(first_rank, experts, 0)
        kept = position < capacity
        slots = ops.where(kept, experts * capacity + position, ops.full_like(position, trash_slot))
        source = hidden if self.top_k == 1 else ops.gather(hidden, assignment % num_tokens, 0)
        buffers = ops.unsorted_segment_sum(source, slots, trash_slot + 1)[:trash_slot]
        dropped = (num_assignments - kept.astype(ms.int32).sum()).astype(ms.int32)
        slots = slots.reshape((self.top_k, num_tokens)).transpose(1, 0)
        return buffers.reshape((self.num_experts, capacity, hidden_size)), slots, dropped

    def combine(self, expert_output, slots, gates):
        """expert_output [E, C, H], slots [N, k], gates [N, k] -> [N, H] gate-weighted sum."""
        num_experts, capacity, hidden_size = expert_output.shape
        rows = ops.concat(
            (expert_output.reshape((num_experts * capacity, hidden_size)),
             ops.zeros((1, hidden_size), expert_output.dtype)), 0
        )
        picked = ops.gather(rows, slots.reshape((-1,)), 0).reshape((slots.shape[0], self.top_k, hidden_size))
        return (picked * gates.astype(picked.dtype).expand_dims(-1)).sum(1)


def gather_planned(hidden, token_rows):
    """hidden [N, H], token_rows [K, C] (N marks an empty row) -> slot buffers [K, C, H]."""
    hidden_size = hidden.shape[1]
    padded = ops.concat((hidden, ops.zeros((1, hidden_size), hidden.dtype)), 0)
    buffers = ops.gather(padded, token_rows.reshape((-1,)), 0)
    return buffers.reshape((token_rows.shape[0], token_rows.shape[1], hidden_size))


def scatter_planned(slot_output, token_rows, num_tokens: int):
    """slot_output [K, C, H] -> [N, H]: each token's row back in place (empty rows are dropped)."""
    hidden_size = slot_output.shape[-1]
    rows = slot_output.reshape((-1, hidden_size))
    return ops.unsorted_segment_sum(rows, token_rows.reshape((-1,)), num_tokens + 1)[:num_tokens]
