"""The optimizer shard: each of the ``n`` ranks that hold the same slice of a parameter keeps AdamW
moments for 1/n of its rows, updates those rows, and the updated rows are gathered.

The rows of dimension 0 are cut (a parameter whose dimension 0 does not divide, or an expert bias
held whole by the model-parallel ranks too, is updated whole on every rank, with whole moments).  The gradients were summed over those ranks before
(``gradients.py``), so each piece's update is the one-process update of those rows, and the gather
(``collectives.GroupGather``) gives every rank the same whole parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from mindspore import Parameter

from mindformers_sigma.distributed.collectives import GroupGather
from mindformers_sigma.distributed.topology import (Topology, optimizer_shard_group, optimizer_shard_index,
                                                    optimizer_shards)
from mindformers_sigma.model import names


@dataclass(frozen=True)
class RowShard:
    """Rows ``index * rows ... (index + 1) * rows`` of a parameter, one of ``count`` pieces."""

    count: int
    index: int
    rows: int
    group: str

    @property
    def first(self) -> int:
        return self.index * self.rows

    def gather(self) -> GroupGather:
        return GroupGather(self.group, self.count, self.index)


def row_shards(parameters: Sequence[Parameter], topology: Topology) -> Tuple[Optional[RowShard], ...]:
    """Each parameter's piece (None: updated whole)."""
    found = []
    for param in parameters:
        expert = names.is_expert_parameter(param.name)
        whole_over_model = "model" not in names.split_axes(param.name, len(param.shape), False)
        count = optimizer_shards(topology, expert, param.shape[0], whole_over_model) if param.shape else 1
        if count == 1:
            found.append(None)
            continue
        group = optimizer_shard_group(topology, expert)[0]
        found.append(RowShard(count, optimizer_shard_index(topology, expert), param.shape[0] // count, group))
    return tuple(found)
