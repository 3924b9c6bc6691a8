"""Hybrid AdamWeightDecay: PanGu-α's AdamW with a separate epsilon for the RRE expert weights.

PanGu-Σ reports a much smaller epsilon for the sparse layers (their gradients are small and
sparse); MindSpore's AdamWeightDecay has one epsilon for all groups, so this optimizer keeps
one per parameter.  Update rule (as MindSpore's AdamWeightDecay, no bias correction):
``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``; ``p -= lr (m / (sqrt(v) + eps) + wd p)``.
No weight decay on LayerNorm, biases or the (non-trainable) routing table.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.config import TrainConfig
from mindformers_sigma.parallel.optimizer_shard import RowShard, row_shards
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.model import names
from mindformers_sigma.training.lr_schedule import learning_rates

_adam_update = ops.MultitypeFuncGraph("adam_update")


@_adam_update.register("Function", "Number", "Number", "Tensor", "Number", "Number", "Tensor", "Tensor", "Tensor",
                       "Tensor")
def _update(fused_adam, beta1, beta2, lr, eps, weight_decay, param, moment1, moment2, grad):
    """One fused kernel per parameter (MindSpore's AdamWeightDecay primitive): moments and weight in place."""
    return fused_adam(param, moment1, moment2, lr, beta1, beta2, eps, weight_decay, grad.astype(param.dtype))


_lazy_update = ops.MultitypeFuncGraph("lazy_adam_update")


def adamw_step(beta1, beta2, lr, eps, weight_decay, param, moment1, moment2, grad):
    """(new param, new first moment, new second moment): the fused kernel's rule, written out."""
    new_m = beta1 * moment1 + (1 - beta1) * grad
    new_v = beta2 * moment2 + (1 - beta2) * grad * grad
    return param - lr * (new_m / (ops.sqrt(new_v) + eps) + weight_decay * param), new_m, new_v


@_lazy_update.register("Number", "Number", "Tensor", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _update_touched_experts(beta1, beta2, lr, eps, weight_decay, param, moment1, moment2, grad):
    """The same AdamW step, applied only to the experts (rows of axis 0) whose gradient is not all zero:
    an expert no token reached keeps its weights and moments bit for bit (no decay, no moment decay)."""
    grad = grad.astype(param.dtype)
    touched = ops.abs(grad).sum(axis=tuple(range(1, grad.ndim)), keepdims=True) > 0
    new_param, new_m, new_v = adamw_step(beta1, beta2, lr, eps, weight_decay, param, moment1, moment2, grad)
    ops.assign(moment1, ops.where(touched, new_m, moment1))
    ops.assign(moment2, ops.where(touched, new_v, moment2))
    return ops.assign(param, ops.where(touched, new_param, param))


class RowShardUpdate(nn.Cell):
    """The optimizer shard's step for one parameter: AdamW on this rank's rows (its moments hold only
    those), then the updated rows of every rank gathered into the whole parameter (``parallel/optimizer_shard.py``)."""

    def __init__(self, shard: RowShard, beta1: float, beta2: float, eps: float, weight_decay: float):
        super().__init__()
        self.first, self.last = shard.first, shard.first + shard.rows
        self.gather = shard.gather()
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay

    def construct(self, param, moment1, moment2, grad, lr):
        rows = param[self.first:self.last]
        new_rows, new_m, new_v = adamw_step(self.beta1, self.beta2, lr, self.eps, self.weight_decay, rows, moment1,
                                            moment2, grad[self.first:self.last].astype(param.dtype))
        ops.assign(moment1, new_m)
        ops.assign(moment2, new_v)
        return ops.assign(param, self.gather(new_rows).reshape(param.shape))


def takes_weight_decay(parameter_name: str) -> bool:
    """Matrices and embeddings decay; LayerNorm gains/shifts and biases do not."""
    return not names.is_bias_or_norm(parameter_name)


class HybridAdamWeightDecay(nn.Optimizer):
    """AdamW whose epsilon and weight decay are chosen per parameter."""

    def __init__(self, params: Sequence[ms.Parameter], learning_rate, beta1: float, beta2: float,
                 eps: float, expert_eps: float, weight_decay: float, lazy_experts: bool = False,
                 row_shards: Optional[Sequence[Optional[RowShard]]] = None):
        """``lazy_experts``: every parameter is an expert tensor, updated only where its gradient is
        (``train.freeze_shared``); ``row_shards``: the optimizer shard, each parameter's rows this rank
        updates (None: all of them)."""
        super().__init__(learning_rate, list(params))
        self.lazy_experts = lazy_experts
        self.beta1 = beta1
        self.beta2 = beta2
        self.param_eps = tuple(expert_eps if names.is_expert_parameter(p.name) else eps for p in self._parameters)
        self.param_decay = tuple(weight_decay if takes_weight_decay(p.name) else 0.0 for p in self._parameters)
        self.row_updates = None
        if row_shards is not None and any(row_shards):
            self.moments1 = _moments(self._parameters, row_shards, names.MOMENTS[0])
            self.moments2 = _moments(self._parameters, row_shards, names.MOMENTS[1])
            self.row_updates = nn.CellList([
                RowShardUpdate(shard or RowShard(1, 0, p.shape[0], ""), beta1, beta2, epsilon, decay)
                for p, shard, epsilon, decay in zip(self._parameters, row_shards, self.param_eps, self.param_decay)])
        else:
            self.moments1 = self._parameters.clone(prefix=names.MOMENTS[0], init="zeros")
            self.moments2 = self._parameters.clone(prefix=names.MOMENTS[1], init="zeros")
        self.hyper_map = ops.HyperMap()
        self.fused_adam = ops.AdamWeightDecay()
        self.assignadd = ops.AssignAdd()

    def construct(self, grads):
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.lazy_experts:
            return self.hyper_map(ops.partial(_lazy_update, self.beta1, self.beta2, lr), self.param_eps,
                                  self.param_decay, self._parameters, self.moments1, self.moments2, grads)
        if self.row_updates is not None:
            done = ()
            for index in range(len(grads)):
                done += (self.row_updates[index](self._parameters[index], self.moments1[index], self.moments2[index],
                                                 grads[index], lr),)
            return done
        return self.hyper_map(ops.partial(_adam_update, self.fused_adam, self.beta1, self.beta2, lr), self.param_eps,
                              self.param_decay, self._parameters, self.moments1, self.moments2, grads)


def _moments(params, row_shards, prefix: str) -> ms.ParameterTuple:
    """Zero moments of each parameter's rows this rank updates, named as ``clone`` names them."""
    return ms.ParameterTuple(
        ms.Parameter(ops.zeros(((shard.rows,) + tuple(p.shape[1:])) if shard else tuple(p.shape), p.dtype),
                     name=f"{prefix}.{p.name}") for p, shard in zip(params, row_shards))


def build_optimizer(network: nn.Cell, train: TrainConfig, without_experts: bool = False,
                    topology: Optional[Topology] = None) -> HybridAdamWeightDecay:
    """Optimizer over the network's trainable parameters with the warmup+cosine schedule;
    ``without_experts``: the experts are updated on the host (ECSS, ``ecss/``); ``train.freeze_shared``:
    over the experts alone, lazily; ``topology``: shard the update over the ranks sharing each slice."""
    params = [p for p in network.trainable_params() if not (without_experts and names.is_expert_parameter(p.name))
              and (names.is_expert_parameter(p.name) or not train.freeze_shared)]
    return HybridAdamWeightDecay(params, learning_rates(train), train.beta1, train.beta2,
                                 train.eps, train.expert_eps, train.weight_decay, lazy_experts=train.freeze_shared,
                                 row_shards=row_shards(params, topology) if topology is not None else None)
