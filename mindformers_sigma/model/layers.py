"""Small building blocks shared by the model: a linear layer and a float32 LayerNorm."""

from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_sigma.native.layer_norm import native_layer_norm

class Linear(nn.Cell):
    """``x @ weight + bias`` with weight stored ``[in, out]`` (PanGu-α layout), computed in ``compute_dtype``.

    ``reduce``: a row-parallel layer's sum of partial products over the model-parallel ranks
    (``distributed/collectives.py``), applied before the (whole) bias is added once."""

    def __init__(self, in_features: int, out_features: int, init_std: float, compute_dtype=ms.float32,
                 reduce: Optional[nn.Cell] = None):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.reduce = reduce
        self.weight = Parameter(initializer(Normal(init_std), (in_features, out_features), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), ms.float32), name="bias")
        self.matmul = ops.MatMul()  # primitives, so that parallel/strategies.py can shard them
        self.add_bias = ops.Add()

    def construct(self, x):
        shape = x.shape
        flat = x.reshape((-1, shape[-1])).astype(self.compute_dtype)
        out = self.matmul(flat, self.weight.astype(self.compute_dtype))
        if self.reduce is not None:
            out = self.reduce(out)
        out = self.add_bias(out, self.bias.astype(self.compute_dtype))
        return out.reshape(shape[:-1] + (out.shape[-1],))


class LayerNorm(nn.Cell):
    """LayerNorm computed in float32 whatever the compute dtype (fp16 statistics are unstable); on CPU the
    native kernel pair (``native/layer_norm.py``) where it applies, else MindSpore's."""

    def __init__(self, hidden_size: int, epsilon: float):
        super().__init__()
        self.gamma = Parameter(initializer("ones", (hidden_size,), ms.float32), name="gamma")
        self.beta = Parameter(initializer("zeros", (hidden_size,), ms.float32), name="beta")
        self.native = native_layer_norm()
        self.epsilon = Tensor([epsilon], ms.float32)
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=epsilon)

    def construct(self, x):
        if self.native is not None:
            out, _, _ = self.native(x.astype(ms.float32), self.gamma, self.beta, self.epsilon)
        else:
            out, _, _ = self.norm(x.astype(ms.float32), self.gamma, self.beta)
        return out
