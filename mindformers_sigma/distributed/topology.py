"""Each rank's coordinates in the data x model x expert mesh, and the ranks of each of its groups.

Ranks are numbered row-major over ``[dp, mp]`` (model parallel fastest), as MindSpore numbers a
device matrix, so the ``mp`` ranks of one data shard are neighbours (one server).  Expert parallel
splits the data axis as ``[dp / ep, ep]``: the ``ep`` ranks of one *expert block* (same model
index) hold different experts and exchange tokens; ranks ``ep * mp`` apart hold the same experts
and reduce their gradients.  Pure Python: the launcher, the planner and the checkpoint merge use it
without MindSpore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

# A group's name says which axis it spans and which slice of the other axes it sits in.
GroupRanks = Tuple[str, Tuple[int, ...]]


@dataclass(frozen=True)
class Topology:
    """One rank of a ``data_parallel x model_parallel`` world, experts split over ``expert_parallel``."""

    data_parallel: int = 1
    model_parallel: int = 1
    expert_parallel: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel

    @property
    def data_index(self) -> int:
        return self.rank // self.model_parallel

    @property
    def model_index(self) -> int:
        return self.rank % self.model_parallel

    @property
    def expert_index(self) -> int:
        """Which 1/ep of the experts this rank holds."""
        return self.data_index % self.expert_parallel

    @property
    def expert_block(self) -> int:
        """Which group of ``ep`` data shards this rank exchanges tokens with."""
        return self.data_index // self.expert_parallel

    def _rank_at(self, data_index: int, model_index: int) -> int:
        return data_index * self.model_parallel + model_index

    def data_group(self) -> GroupRanks:
        """Same model slice, every data shard: dense gradients are summed here."""
        return f"dp_m{self.model_index}", tuple(self._rank_at(d, self.model_index) for d in range(self.data_parallel))

    def model_group(self) -> GroupRanks:
        """Same data shard, every model slice: the tensor-parallel partial sums."""
        return f"mp_d{self.data_index}", tuple(self._rank_at(self.data_index, m) for m in range(self.model_parallel))

    def expert_group(self) -> GroupRanks:
        """Same model slice, the ``ep`` data shards of this block: the token exchange."""
        first = self.expert_block * self.expert_parallel
        return (f"ep_b{self.expert_block}_m{self.model_index}",
                tuple(self._rank_at(first + e, self.model_index) for e in range(self.expert_parallel)))

    def expert_model_group(self) -> GroupRanks:
        """The whole block (``ep x mp`` ranks): the exchange's backward sums the mp partial inputs too."""
        first = self.expert_block * self.expert_parallel
        return (f"epmp_b{self.expert_block}",
                tuple(self._rank_at(first + e, m) for e in range(self.expert_parallel)
                      for m in range(self.model_parallel)))

    def expert_data_group(self) -> GroupRanks:
        """The ranks holding the same experts' same slice: expert gradients are summed here."""
        return (f"edp_e{self.expert_index}_m{self.model_index}",
                tuple(self._rank_at(b * self.expert_parallel + self.expert_index, self.model_index)
                      for b in range(self.data_parallel // self.expert_parallel)))

    def groups(self) -> List[GroupRanks]:
        """Every group this rank belongs to that has more than one member."""
        found = [self.data_group(), self.model_group(), self.expert_group(), self.expert_model_group(),
                 self.expert_data_group()]
        return [group for group in dict(found).items() if len(group[1]) > 1]

    def expert_range(self, num_experts: int) -> range:
        """The experts this rank holds."""
        share = num_experts // self.expert_parallel
        return range(self.expert_index * share, (self.expert_index + 1) * share)

    def describe(self, num_experts: int) -> str:
        experts = self.expert_range(num_experts)
        return (f"rank {self.rank}: data {self.data_index} of {self.data_parallel}, model {self.model_index} of "
                f"{self.model_parallel}, experts {experts.start}..{experts.stop - 1} of {num_experts} "
                f"(expert shard {self.expert_index} of {self.expert_parallel})")


def all_ranks(data_parallel: int, model_parallel: int, expert_parallel: int) -> List[Topology]:
    return [Topology(data_parallel, model_parallel, expert_parallel, rank)
            for rank in range(data_parallel * model_parallel)]


def slice_of(topology: Topology, kind: str) -> Tuple[int, int]:
    """(index, count) of this rank's piece along a split of ``kind`` ("model" or "expert")."""
    if kind == "model":
        return topology.model_index, topology.model_parallel
    return topology.expert_index, topology.expert_parallel


def optimizer_shard_group(topology: Topology, is_expert: bool) -> GroupRanks:
    """The ranks holding the same slice of a parameter, among which the optimizer shard splits its update."""
    return topology.expert_data_group() if is_expert else topology.data_group()


def optimizer_shard_index(topology: Topology, is_expert: bool) -> int:
    """This rank's place in :func:`optimizer_shard_group`."""
    return topology.expert_block if is_expert else topology.data_index


def optimizer_shards(topology: Topology, is_expert: bool, rows: int, whole_over_model: bool = False) -> int:
    """Into how many pieces the optimizer shard cuts a parameter's dimension 0 of ``rows`` (1: not cut).
    An expert tensor that is whole over the model axis (``b2``) is not cut: its holders span two axes."""
    count = len(optimizer_shard_group(topology, is_expert)[1])
    if is_expert and whole_over_model and topology.model_parallel > 1:
        return 1
    return count if count > 1 and rows % count == 0 else 1
