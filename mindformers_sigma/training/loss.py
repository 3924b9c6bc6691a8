"""The scalar training loss, normalised over the whole global batch.

Each data-parallel rank holds part of the batch.  Dividing each rank's summed NLL by the
*global* token count (all-reduced) and summing gradients across ranks (not averaging) gives
exactly the gradient of the single-process loss, whatever the ranks' token counts are.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class TrainingLoss(nn.Cell):
    """(tokens, domain_ids, loss_scale) -> (scaled loss, loss, nll/domain, tokens/domain, aux, dropped).

    The first output is what is differentiated; the rest are global statistics for logging.
    """

    def __init__(self, network: nn.Cell, aux_loss_coef: float, data_parallel: int):
        super().__init__(auto_prefix=False)
        self.network = network
        self.aux_loss_coef = aux_loss_coef
        self.data_parallel = data_parallel
        self.all_reduce = ops.AllReduce() if data_parallel > 1 else None

    def construct(self, tokens, domain_ids, loss_scale, capacity_hint=None):
        nll, counted, aux_loss, dropped = self.network(tokens, domain_ids, capacity_hint)
        aux_share = aux_loss / self.data_parallel
        if self.all_reduce is not None:
            nll_all = self.all_reduce(nll)
            counted = self.all_reduce(counted)
            aux_loss = self.all_reduce(aux_share)
            dropped = self.all_reduce(dropped.astype(ms.float32)).astype(ms.int32)
        else:
            nll_all = nll
        total = ops.maximum(counted.sum(), 1.0)
        local_loss = nll.sum() / total + self.aux_loss_coef * aux_share
        loss = nll_all.sum() / total + self.aux_loss_coef * aux_loss
        return local_loss * loss_scale, ops.stop_gradient(loss), nll_all, counted, aux_loss, dropped
