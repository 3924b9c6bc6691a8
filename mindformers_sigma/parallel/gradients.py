"""Gradients over several ranks: each summed over the ranks that hold the same slice, and the
global norm that counts every slice of the model once.

A dense parameter's slice is held by every data-parallel rank of its model index, an expert's by
the ``dp / ep`` ranks of its expert index (the other data shards exchange tokens with its owner
instead).  Gradients are summed, never averaged: the loss is already divided by the global batch's
token count (``training/loss.py``), so the sum is the gradient of the global mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindformers_sigma.distributed.collectives import group_name
from mindformers_sigma.distributed.topology import Topology, slice_of
from mindformers_sigma.model import names


def _sum_over(group) -> Optional[ops.AllReduce]:
    name = group_name(group)
    return ops.AllReduce(group=name) if name else None


class GradientReducer(nn.Cell):
    """Sums each gradient over its parameter's data-parallel replicas."""

    def __init__(self, parameters: Sequence[Parameter], topology: Topology):
        super().__init__(auto_prefix=False)
        self.is_expert = tuple(names.is_expert_parameter(p.name) for p in parameters)
        self.dense_sum = _sum_over(topology.data_group())
        self.expert_sum = _sum_over(topology.expert_data_group())

    def construct(self, grads):
        reduced = ()
        for index in range(len(grads)):
            total = self.expert_sum if self.is_expert[index] else self.dense_sum
            reduced += ((grads[index] if total is None else total(grads[index])),)
        return reduced


def copies(name: str, ndim: int, topology: Topology, vocab_parallel: bool) -> int:
    """How many ranks of the world hold the same slice of parameter ``name``."""
    pieces = 1
    for axis in names.split_axes(name, ndim, vocab_parallel):
        if axis is not None:
            pieces *= slice_of(topology, axis)[1]
    return topology.world_size // pieces


@dataclass
class GlobalNorm:
    """The weights and the world sum :func:`training.train_step.unscale_and_clip` takes over several ranks."""

    weights: Tensor
    world_sum: nn.Cell
    host_weight: float  # the weight of the squares of expert gradients summed on the host (ECSS)


def global_norm(parameters: Sequence[Parameter], topology: Topology, vocab_parallel: bool) -> Optional[GlobalNorm]:
    """None in one process (every weight 1, nothing to sum)."""
    if topology.world_size == 1:
        return None
    weights = [1.0 / copies(p.name, len(p.shape), topology, vocab_parallel) for p in parameters]
    host_weight = topology.expert_parallel * topology.model_parallel / topology.world_size  # held by dp / ep ranks
    return GlobalNorm(Tensor(np.array(weights, np.float32)), ops.AllReduce(), host_weight)
