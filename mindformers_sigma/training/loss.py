"""The scalar training loss, normalised by the token count of the whole step.

A step's global batch is split over data-parallel ranks and accumulation micro-batches.
The host counts the predicted tokens of the *whole* global batch before the step and passes
that count to every micro-batch; each micro-batch's summed NLL is divided by it and the
gradients are summed (across micro-batches and across ranks, never averaged).  The sum is
then exactly the gradient of the mean NLL over the global batch, whatever each part's
token count is (EOD positions carry no loss, so parts differ).
"""

from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import nn, ops


class TrainingLoss(nn.Cell):
    """(tokens, domain_ids, loss_scale, token_total, expert_plan, dropout_seed)
    -> (scaled loss, nll/domain, tokens/domain, aux, dropped).

    The first output is what is differentiated; the rest are this micro-batch's statistics,
    summed over data-parallel ranks, for logging.
    """

    def __init__(self, network: nn.Cell, aux_loss_coef: float, data_parallel: int, accumulation_steps: int,
                 data_group: Optional[str] = None):
        """``data_group``: the process group of this rank's data-parallel peers (the statistics are summed
        there; model-parallel peers hold the same ones)."""
        super().__init__(auto_prefix=False)
        self.network = network
        # The auxiliary loss is a mean over every micro-batch of every rank.
        self.aux_weight = aux_loss_coef / (data_parallel * accumulation_steps)
        self.all_reduce = ops.AllReduce(group=data_group) if data_group else None

    def construct(self, tokens, domain_ids, loss_scale, token_total, expert_plan=None, dropout_seed=None):
        nll, counted, aux_loss, dropped = self.network(tokens, domain_ids, expert_plan, dropout_seed)
        loss = nll.sum() / ops.maximum(token_total, 1.0) + self.aux_weight * aux_loss  # a batch may be all EOD
        if self.all_reduce is not None:
            nll = self.all_reduce(nll)
            counted = self.all_reduce(counted)
            aux_loss = self.all_reduce(aux_loss)
            dropped = self.all_reduce(dropped.astype(ms.float32)).astype(ms.int32)
        return loss * loss_scale, nll, counted, aux_loss, dropped
