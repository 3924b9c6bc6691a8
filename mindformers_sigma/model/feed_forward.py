"""The dense GeLU FFN of the bottom (shared) layers."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn

from mindformers_sigma.activations import ACTIVATIONS
from mindformers_sigma.distributed.collectives import Sharding
from mindformers_sigma.model.layers import Linear


class FeedForward(nn.Cell):
    """H -> F -> H with a GeLU (``model.activation``), as in PanGu-α; under model parallelism each rank
    holds F / mp (the mapping column-parallel, the projection row-parallel)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float, compute_dtype=ms.float32,
                 sharding: Sharding = Sharding(), activation: str = "fast_gelu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        local = ffn_hidden_size // sharding.model_parallel
        self.copy_in = sharding.copy_to_model()
        self.mapping = Linear(hidden_size, local, init_std, compute_dtype)
        self.projection = Linear(local, hidden_size, init_std, compute_dtype, reduce=sharding.reduce_from_model())

    def construct(self, hidden):
        return self.projection(self.activation(self.mapping(self.copy_in(hidden))))
