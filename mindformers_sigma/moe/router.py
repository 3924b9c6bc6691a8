"""Routers: map each token to ``top_k`` experts with a gate weight.

All routers share one signature, so the MoE layer and dispatcher are the same for
Random Routed Experts and for the learned-gate baseline:

    construct(hidden [N, H], token_ids [N], token_domains [N])
        -> expert_index [N, k] int32, gates [N, k] float32, aux_loss scalar float32

A router is added here (its Cell and a ``ROUTER_CELLS`` entry) and in ``config.ROUTERS`` (what the
rest of the project needs to know of it); nothing else names routers.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_sigma.config import MoEConfig, ModelConfig


class RandomRoutedRouter(nn.Cell):
    """RRE: the domain picks the expert group, a fixed random table picks the expert.

    The table is a non-trainable Parameter so it is saved in (and restored from)
    checkpoints; there is no learned gate and no auxiliary loss.
    """

    def __init__(self, routing_table: np.ndarray):
        super().__init__()
        self.num_domains, self.vocab_size = routing_table.shape
        self.routing_table = Parameter(
            Tensor(routing_table.astype(np.int32)), name="routing_table", requires_grad=False
        )

    def construct(self, hidden, token_ids, token_domains):
        flat_index = token_domains * self.vocab_size + token_ids
        expert_index = ops.gather(self.routing_table.reshape((-1,)), flat_index, 0).reshape((-1, 1))
        gates = ops.ones((hidden.shape[0], 1), ms.float32)
        return expert_index, gates, ops.zeros((), ms.float32)


class LearnedTopKRouter(nn.Cell):
    """Softmax gate over all experts: top-1 is Switch, top-2 is GShard (gates renormalised).

    The auxiliary load-balancing loss is ``E * sum_e f_e * P_e`` (Switch Transformer), with
    ``f_e`` the share of tokens whose first choice is ``e`` and ``P_e`` the mean gate
    probability of ``e``; it is 1 for perfectly balanced routing and grows with skew.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = Parameter(initializer(Normal(init_std), (hidden_size, num_experts), ms.float32), name="weight")

    def construct(self, hidden, token_ids, token_domains):
        logits = ops.matmul(hidden.astype(ms.float32), self.weight)
        probs = ops.softmax(logits, -1)
        gate_values, expert_index = ops.topk(probs, self.top_k)
        if self.top_k > 1:
            gate_values = gate_values / gate_values.sum(-1, keepdims=True)
        return expert_index.astype(ms.int32), gate_values, load_balancing_loss(probs, expert_index[:, 0], self.num_experts)


def load_balancing_loss(probs, first_choice, num_experts: int):
    """Switch-style auxiliary loss from router probabilities [N, E] and first choices [N]."""
    num_tokens = probs.shape[0]
    token_share = ops.unsorted_segment_sum(
        ops.ones((num_tokens,), ms.float32), first_choice.astype(ms.int32), num_experts
    ) / num_tokens
    prob_share = probs.mean(0)
    return num_experts * (token_share * prob_share).sum()


def _random_routed(model: ModelConfig, moe: MoEConfig, routing_table: Optional[np.ndarray]) -> nn.Cell:
    if routing_table is None:
        raise ValueError("an RRE layer needs its routing table")
    return RandomRoutedRouter(routing_table)


def _learned_top_k(model: ModelConfig, moe: MoEConfig, routing_table: Optional[np.ndarray]) -> nn.Cell:
    return LearnedTopKRouter(model.hidden_size, moe.num_experts, moe.top_k, model.init_std)


# moe.router -> the router Cell of one sparse layer, from (model, moe, the layer's routing table or None)
ROUTER_CELLS: Dict[str, Callable[[ModelConfig, MoEConfig, Optional[np.ndarray]], nn.Cell]] = {
    "rre": _random_routed,
    "switch": _learned_top_k,
    "gshard": _learned_top_k,
}


def build_router(model: ModelConfig, moe: MoEConfig, routing_table: Optional[np.ndarray]) -> nn.Cell:
    """The configured router of one sparse layer."""
    return ROUTER_CELLS[moe.router](model, moe, routing_table)
