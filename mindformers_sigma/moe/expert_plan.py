"""Host-side dispatch plans for RRE: which token fills which row of which expert slot.

RRE routing is a pure function of (domain id, token id), so the host knows, before the step,
every token's expert in every sparse layer.  Instead of one ``[E, C, H]`` buffer sized for the
busiest expert (which computes 2-4x the real rows when a batch's domain mix is uneven and
leaves the experts of absent domains idle), the host cuts each *active* expert's tokens into
slots of ``C`` rows; a busy expert takes several slots, an absent one none.  The plan of one
sparse layer is a ``[K, C + 1]`` int32 array:

* column 0: the expert whose weights slot ``k`` uses;
* columns 1..C: the (flattened ``[B*S]``) index of the token in each row, or ``B*S`` for an
  empty row (the model gathers a zero row there and scatters its output nowhere).

A step's plans are stacked to ``[L, K, C + 1]`` (unused slots of a layer are all-empty), and
``K`` and ``C`` change from batch to batch: the training graph declares both dimensions
dynamic, so it compiles once whatever the batch.  ``C`` is chosen per batch to minimise the
rows computed plus a per-slot cost (the slot's weight gather), so padding stays near 1.
The plan is a pure function of the batch, so a resumed run plans alike.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np


# What one slot's weight gather (and its gradient's scatter) costs, in rows of expert compute.
SLOT_COST_ROWS = 16
ROW_ALIGN = 8


def _slots_per_expert(loads: np.ndarray, rows: int) -> np.ndarray:
    return -(-loads // rows)


def _slots_needed(loads: np.ndarray, rows: int) -> int:
    return int(np.sum(_slots_per_expert(loads, rows)))


def slot_rows(layer_loads: List[np.ndarray]) -> int:
    """Rows per slot that minimise ``K * (C + SLOT_COST_ROWS)`` over the step's layers.

    Candidates are each active expert's load divided into 1-4 equal slots, rounded up to a
    multiple of 8; ``K`` is the largest slot count of any layer (the stacked plan's height).
    """
    active = np.concatenate([loads[loads > 0] for loads in layer_loads])
    if active.size == 0:
        return ROW_ALIGN
    candidates = {ROW_ALIGN * math.ceil(load / parts / ROW_ALIGN) for load in active.tolist() for parts in (1, 2, 3, 4)}

    def cost(rows: int) -> int:
        return max(_slots_needed(loads, rows) for loads in layer_loads) * (rows + SLOT_COST_ROWS)

    return min(sorted(candidates), key=cost)


class ExpertPlanner:
    """Dispatch plans for the RRE layers of a model, from its routing tables.

    ``experts``: the experts this rank holds (expert parallel); a plan then names them by their
    index in that range and leaves out the tokens routed to other ranks."""

    def __init__(self, routing_tables: List[np.ndarray], num_experts: int, experts: Optional[range] = None):
        self.tables = routing_tables
        self.num_experts = num_experts
        self.experts = experts if experts is not None else range(num_experts)

    def token_experts(self, input_ids: np.ndarray, domain_ids: np.ndarray) -> List[np.ndarray]:
        """Each layer's expert of every token, flattened ``[B*S]``."""
        token_domains = np.repeat(domain_ids, input_ids.shape[1])
        flat = input_ids.reshape(-1)
        return [table[token_domains, flat] for table in self.tables]

    def active_experts(self, input_ids: np.ndarray, domain_ids: np.ndarray) -> List[np.ndarray]:
        """Each layer's experts that at least one token of the batch goes to, sorted."""
        return [np.unique(e).astype(np.int32) for e in self.token_experts(input_ids, domain_ids)]

    def plan(self, input_ids: np.ndarray, domain_ids: np.ndarray) -> np.ndarray:
        """input_ids [B, S], domain_ids [B] -> the stacked plan ``[L, K, C + 1]`` int32."""
        num_tokens = input_ids.size
        held = len(self.experts)
        experts = [e - self.experts.start for e in self.token_experts(input_ids, domain_ids)]
        mine = [np.flatnonzero((e >= 0) & (e < held)) for e in experts]
        loads = [np.bincount(e[m], minlength=held) for e, m in zip(experts, mine)]
        rows = slot_rows(loads)
        height = max(1, max(_slots_needed(layer, rows) for layer in loads))
        plan = np.full((len(experts), height, rows + 1), num_tokens, dtype=np.int32)
        plan[:, :, 0] = 0
        for layer, (token_expert, tokens, layer_loads) in enumerate(zip(experts, mine, loads)):
            slots = _slots_per_expert(layer_loads, rows)
            plan[layer, :slots.sum(), 0] = np.repeat(np.arange(held), slots)
            # Token j of expert e (in token order) goes to that expert's slot j // C, row j % C.
            order = tokens[np.argsort(token_expert[tokens], kind="stable")]
            rank = np.arange(order.size) - np.repeat(np.cumsum(layer_loads) - layer_loads, layer_loads)
            first_slot = np.cumsum(slots) - slots
            plan[layer, first_slot[token_expert[order]] + rank // rows, 1 + rank % rows] = order
        return plan


def padding_ratio(plan: np.ndarray, num_tokens: int) -> float:
    """Expert rows each sparse layer computes per real token (1.0 = no padding)."""
    return plan.shape[1] * (plan.shape[2] - 1) / num_tokens
