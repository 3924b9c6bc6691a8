"""A bank of GeLU FFN experts (``model.activation``) computed together with BatchMatMul over the expert axis."""

from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_sigma.activations import ACTIVATIONS


class BatchedExperts(nn.Cell):
    """``num_experts`` FFNs (H -> F -> H) stored as ``[E, H, F]`` / ``[E, F, H]`` tensors.

    Each expert has the same shapes and names as the dense FFN, so a dense checkpoint can be
    copied into every expert ("expert inheriting").
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float,
                 compute_dtype=ms.float32, reduce: Optional[nn.Cell] = None, activation: str = "fast_gelu"):
        """Under model parallelism ``ffn_hidden_size`` is this rank's F / mp, and ``reduce`` sums the
        partial outputs over mp before the (whole) ``b2`` is added."""
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.compute_dtype = compute_dtype
        self.reduce = reduce
        self.w1 = Parameter(initializer(Normal(init_std), (num_experts, hidden_size, ffn_hidden_size), ms.float32), name="w1")
        self.b1 = Parameter(initializer("zeros", (num_experts, 1, ffn_hidden_size), ms.float32), name="b1")
        self.w2 = Parameter(initializer(Normal(init_std), (num_experts, ffn_hidden_size, hidden_size), ms.float32), name="w2")
        self.b2 = Parameter(initializer("zeros", (num_experts, 1, hidden_size), ms.float32), name="b2")
        self.up = ops.BatchMatMul()  # two primitives: the parallel layer shards them differently
        self.down = ops.BatchMatMul()

    def construct(self, buffers, slot_expert=None):
        """buffers [E, C, H] -> [E, C, H]; or, with ``slot_expert`` [K], buffers [K, C, H] -> [K, C, H].

        With ``slot_expert`` slot ``k`` is computed with expert ``slot_expert[k]``'s weights
        (gathered, so an expert may fill several slots and an idle one none).
        """
        dtype = self.compute_dtype
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if slot_expert is not None:
            w1 = ops.gather(w1, slot_expert, 0)
            b1 = ops.gather(b1, slot_expert, 0)
            w2 = ops.gather(w2, slot_expert, 0)
            b2 = ops.gather(b2, slot_expert, 0)
        hidden = self.up(buffers.astype(dtype), w1.astype(dtype)) + b1.astype(dtype)
        hidden = self.activation(hidden)
        output = self.down(hidden, w2.astype(dtype))
        if self.reduce is not None:
            output = self.reduce(output)
        return output + b2.astype(dtype)
