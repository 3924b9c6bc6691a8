"""One compiled training step: forward, backward, global-norm clipping, optimizer update."""

from __future__ import annotations

from mindspore import nn, ops


class TrainOneStepCell(nn.Cell):
    """Runs ``network(*batch)`` (which returns ``(loss, *stats)``), differentiates the loss, updates.

    Returns the network's outputs unchanged so the loop can log loss parts and dropped tokens.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, grad_clip_norm: float):
        super().__init__(auto_prefix=False)
        self.network = network
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_clip_norm = grad_clip_norm
        self.value_and_grad = ops.value_and_grad(network, None, self.weights, has_aux=True)

    def construct(self, tokens, domain_ids):
        outputs, grads = self.value_and_grad(tokens, domain_ids)
        if self.grad_clip_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip_norm)
        self.optimizer(grads)
        return outputs
