"""Compiled training steps: forward/backward with loss scaling, overflow skip, clipping, update.

``ForwardBackward`` and ``ApplyGradients`` are separate cells so that gradient accumulation
can run several forward/backward passes before one update; ``TrainOneStepCell`` fuses them
into one graph for the common case of no accumulation.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindformers_sigma.config import TrainConfig

_unscale = ops.MultitypeFuncGraph("unscale")


@_unscale.register("Tensor", "Tensor")
def _unscale_grad(inverse_scale, grad):
    return grad * ops.cast(inverse_scale, grad.dtype)


class DynamicLossScale(nn.Cell):
    """Loss-scale state kept as Parameters (so it is checkpointed) and its update rule.

    An overflowing step divides the scale by ``factor`` (never below 1); ``window`` clean steps
    in a row multiply it by ``factor``.  With ``loss_scale: none`` the scale stays 1.
    """

    def __init__(self, train: TrainConfig):
        super().__init__()
        self.dynamic = train.loss_scale == "dynamic"
        initial = train.initial_loss_scale if self.dynamic else 1.0
        self.scale = Parameter(Tensor(initial, ms.float32), name="loss_scale", requires_grad=False)
        self.clean_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_clean_steps", requires_grad=False)
        self.factor = train.loss_scale_factor
        self.window = train.loss_scale_window

    def update(self, finite):
        if self.dynamic:
            clean = ops.select(finite, self.clean_steps + 1, ops.zeros_like(self.clean_steps))
            grow = clean >= self.window
            scale = ops.select(finite, ops.select(grow, self.scale * self.factor, self.scale),
                               ops.maximum(self.scale / self.factor, 1.0))
            ops.assign(self.scale, scale)
            ops.assign(self.clean_steps, ops.select(grow, ops.zeros_like(clean), clean))
        return finite


class ForwardBackward(nn.Cell):
    """Loss statistics and (data-parallel reduced) scaled gradients for one micro-batch."""

    def __init__(self, loss_cell: nn.Cell, weights, data_parallel: int):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.value_and_grad = ops.value_and_grad(loss_cell, None, weights, has_aux=True)
        self.grad_reducer = nn.DistributedGradReducer(weights, mean=False) if data_parallel > 1 else None

    def construct(self, tokens, domain_ids, loss_scale, capacity_hint=None):
        outputs, grads = self.value_and_grad(tokens, domain_ids, loss_scale, capacity_hint)
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        return outputs[1:], grads


class ApplyGradients(nn.Cell):
    """Unscale, check for inf/nan, clip by global norm, update (skipped on overflow), adjust scale."""

    def __init__(self, optimizer: nn.Optimizer, loss_scale: DynamicLossScale, grad_clip_norm: float):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.grad_clip_norm = grad_clip_norm
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, divisor):
        grads = self.hyper_map(ops.partial(_unscale, 1.0 / (self.loss_scale.scale * divisor)), grads)
        finite = ops.stack([ops.isfinite(grad).all() for grad in grads]).all()
        if self.grad_clip_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip_norm)
        if finite:
            self.optimizer(grads)
        return self.loss_scale.update(finite)


class TrainOneStepCell(nn.Cell):
    """One fused step: returns (loss, nll/domain, tokens/domain, aux, dropped, finite, loss scale used)."""

    def __init__(self, forward_backward: ForwardBackward, apply_gradients: ApplyGradients):
        super().__init__(auto_prefix=False)
        self.forward_backward = forward_backward
        self.apply_gradients = apply_gradients
        self.one = Tensor(1.0, ms.float32)

    def construct(self, tokens, domain_ids, capacity_hint=None):
        scale = self.apply_gradients.loss_scale.scale * 1.0
        stats, grads = self.forward_backward(tokens, domain_ids, scale, capacity_hint)
        finite = self.apply_gradients(grads, self.one)
        return stats + (finite, scale)
