"""The dense fast-GeLU FFN of the bottom (shared) layers."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn

from mindformers_sigma.activations import fast_gelu
from mindformers_sigma.model.layers import Linear


class FeedForward(nn.Cell):
    """H -> F -> H with fast-GeLU, as in PanGu-α."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float, compute_dtype=ms.float32):
        super().__init__()
        self.mapping = Linear(hidden_size, ffn_hidden_size, init_std, compute_dtype)
        self.projection = Linear(ffn_hidden_size, hidden_size, init_std, compute_dtype)

    def construct(self, hidden):
        return self.projection(fast_gelu(self.mapping(hidden)))
