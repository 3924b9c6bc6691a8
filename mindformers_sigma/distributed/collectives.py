"""Every collective the parallel layers use, as Cells with the backward pass each one needs.

One primitive does the work: a sum over a process group (AllReduce), the only collective that
MindSpore 2.10's CPU backend (mccl) runs on sub-groups.  A gather is the sum of zero buffers in
which each rank wrote its own part (exact: adding zeros changes no bit); the expert token exchange
is such a gather and its return such a sum.  Where the backend has AllGather on a group (Ascend's
HCCL; CPU on the world group only) :class:`GroupGather` can use it instead (``form="all_gather"``);
a test checks that both forms agree where both run.

The backward groups follow Megatron's rule: an activation replicated over the model-parallel
ranks enters a split layer through "copy" (identity forward, sum of the partial input gradients
backward) and leaves it through "reduce" (sum of partial outputs forward, identity backward), so
each rank's loss counts once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


import numpy as np
from mindspore import Tensor, nn, ops

from mindformers_sigma.distributed.topology import GroupRanks, Topology

ALL_GATHER, ALL_REDUCE = "all_gather", "all_reduce"


class GroupSum(nn.Cell):
    """Forward: the sum over ``forward_group``; backward: the sum of the gradient over ``backward_group``
    (None: identity either way)."""

    def __init__(self, forward_group: Optional[str] = None, backward_group: Optional[str] = None):
        super().__init__()
        self.forward_sum = ops.AllReduce(group=forward_group) if forward_group else None
        self.backward_sum = ops.AllReduce(group=backward_group) if backward_group else None

    def construct(self, x):
        if self.forward_sum is None:
            return x
        return self.forward_sum(x)

    def bprop(self, x, out, dout):
        if self.backward_sum is None:
            return (dout,)
        return (self.backward_sum(dout),)


def one_hot(size: int, index: int) -> Tensor:
    """The mask :func:`place` takes: 1 at ``index`` of ``size``."""
    return Tensor(np.eye(size, dtype=np.float32)[index])


def place(x, mask):
    """x [N, ...], mask [size] one-hot -> [size, N, ...]: ``x`` where the mask is 1, zeros elsewhere
    (one rank's part of a summed gather; its gradient is the gradient at that place)."""
    size = mask.shape[0]
    return ops.tile(x.expand_dims(0), (size,) + (1,) * x.ndim) * mask.astype(x.dtype).reshape((size,) + (1,) * x.ndim)


class GroupGather(nn.Cell):
    """x [N, ...] -> [size, N, ...], every member's ``x`` in group order (no gradient: for statistics
    such as the vocabulary-parallel maximum, and for logits at inference)."""

    def __init__(self, group: Optional[str], size: int, index: int, form: str = ALL_REDUCE):
        super().__init__()
        self.size = size
        self.mask = one_hot(size, index)
        self.all_gather = ops.AllGather(group=group) if group and form == ALL_GATHER else None
        self.all_reduce = ops.AllReduce(group=group) if group and form == ALL_REDUCE else None

    def construct(self, x):
        x = ops.stop_gradient(x)
        if self.all_gather is not None:
            return self.all_gather(x).reshape((self.size,) + x.shape)
        if self.all_reduce is not None:
            return self.all_reduce(place(x, self.mask))
        return x.expand_dims(0)


def group_name(group: GroupRanks) -> Optional[str]:
    """The group's name, or None for a group of one rank (nothing to sum over)."""
    return group[0] if len(group[1]) > 1 else None


def _sum(forward: GroupRanks = None, backward: GroupRanks = None) -> nn.Cell:
    """A GroupSum over these groups, or a plain identity where both are one rank (no custom backward, which
    would keep its inputs alive and stop the graph compiler's fusion)."""
    forward_name = group_name(forward) if forward else None
    backward_name = group_name(backward) if backward else None
    if forward_name is None and backward_name is None:
        return nn.Identity()
    return GroupSum(forward_name, backward_name)


@dataclass(frozen=True)
class Sharding:
    """What a model cell needs to split itself: this rank's place and the collectives over its groups.

    The default is one process: every collective is the identity and nothing is split."""

    topology: Topology = Topology()
    vocab_parallel: bool = False

    @property
    def model_parallel(self) -> int:
        return self.topology.model_parallel

    @property
    def model_index(self) -> int:
        return self.topology.model_index

    @property
    def expert_parallel(self) -> int:
        return self.topology.expert_parallel

    @property
    def expert_index(self) -> int:
        return self.topology.expert_index

    @property
    def splits_vocabulary(self) -> bool:
        return self.vocab_parallel and self.model_parallel > 1

    def copy_to_model(self) -> nn.Cell:
        """Into a split layer: identity forward, partial input gradients summed over mp."""
        return _sum(backward=self.topology.model_group())

    def reduce_from_model(self) -> nn.Cell:
        """Out of a split layer: partial outputs summed over mp, identity backward."""
        return _sum(forward=self.topology.model_group())

    def gather_model(self) -> GroupGather:
        return GroupGather(group_name(self.topology.model_group()), self.model_parallel, self.model_index)

    def expert_dispatch(self) -> nn.Cell:
        """Tokens to the experts' owners (a summed gather over ep); the backward also sums the mp partial
        input gradients of the split experts."""
        return _sum(self.topology.expert_group(), self.topology.expert_model_group())

    def expert_combine(self) -> nn.Cell:
        """Expert outputs back to their tokens' ranks (a sum over ep, replicated over mp)."""
        return _sum(self.topology.expert_group(), self.topology.expert_group())


def create_groups(topology: Topology) -> None:
    """Create this rank's process groups (every member calls this with the same names and ranks)."""
    from mindspore.communication import create_group

    for name, ranks in topology.groups():
        create_group(name, list(ranks))


