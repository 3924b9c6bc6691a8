"""What the host prepares before each step: this rank's micro-batches of the step's global batch.

A step reads ``train.batch_size`` consecutive global positions.  They form
``grad_accumulation_steps x data_parallel`` parts of equal size; part ``k = m * G + r`` is
micro-batch ``m`` of rank ``r`` (so one process accumulating ``G`` micro-batches reads exactly
what ``G`` data-parallel ranks read).  Every rank reads the whole global batch, which is small
(token ids only), so that all ranks agree, without communicating, on:

* the loss normaliser: the number of predicted (non-EOD input) tokens of the global batch;
* each part's dropout seed, a pure function of ``(context.seed, step, k)``.

Each part's RRE dispatch plan (``moe/expert_plan.py``) is made for that part alone: the
graph declares its sizes dynamic, so ranks need not agree on them.  Under expert parallelism a
rank's plan covers the tokens of its whole expert block (the ``ep`` data shards that exchange
tokens, in shard order) and names only the experts it holds.  Model-parallel ranks of one data
shard read the same rows.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindformers_sigma.moe.expert_plan import ExpertPlanner


PLAN_INPUT = 3  # (tokens, domain_ids, token_total, expert_plan, dropout_seed)


@dataclass
class StepBatch:
    """This rank's micro-batch inputs for one step, and where the next step reads."""

    micro_batches: List[Tuple[Tensor, ...]]
    token_total: int
    next_position: int

    @property
    def graph_key(self) -> tuple:
        """What decides whether a step compiles a new graph: the input shapes, except the
        RRE plan's (input 3), whose slot and row dimensions are declared dynamic."""
        return tuple(None if t is None else (len(t.shape) if i == PLAN_INPUT else tuple(t.shape))
                     for inputs in self.micro_batches for i, t in enumerate(inputs))



def dropout_seed(base_seed: int, step: int, part: int) -> int:
    """The dropout seed of part ``part`` of step ``step`` (0-based), independent of the process."""
    return int(np.random.default_rng([base_seed, step, part]).integers(0, 2 ** 31 - 1))


def predicted_tokens(tokens: np.ndarray, eod_token_id: int) -> int:
    """Positions that carry loss: inputs (all but the last token of a sample) that are not EOD."""
    return int(np.count_nonzero(tokens[:, :-1] != eod_token_id))


class GlobalBatchReader:
    """Reads each step's global batch from ``source`` and cuts out this rank's micro-batches."""

    def __init__(self, source, batch_size: int, data_parallel: int, rank: int, accumulation_steps: int,
                 eod_token_id: int, planner: Optional[ExpertPlanner], base_seed: int, dropout: bool,
                 stage_plans: Optional[Callable[[List[np.ndarray], int, List[List[np.ndarray]]],
                                                List[np.ndarray]]] = None, expert_parallel: int = 1):
        """``stage_plans(plans, tokens_per_plan, micro_experts)``: called with each step's micro-batch
        plans (and each micro-batch index's experts over all ranks) before they become inputs;
        returns the plans to use (ECSS stages the slab loads and renames experts to slots).
        ``rank``: this rank's data-parallel index."""
        self.source = source
        self.expert_parallel = expert_parallel
        self.batch_size = batch_size
        self.data_parallel = data_parallel
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.part_size = batch_size // (data_parallel * accumulation_steps)
        self.eod_token_id = eod_token_id
        self.planner = planner
        self.base_seed = base_seed
        self.dropout = dropout
        self.stage_plans = stage_plans

    def _micro_experts(self, tokens: np.ndarray, domains: np.ndarray) -> List[List[np.ndarray]]:
        """Per micro-batch index, each sparse layer's experts of this rank that index activates on any rank
        (the ranks holding the same experts all-reduce slab gradients slot by slot, so they share one slab
        layout; every rank reads the whole global batch, so each computes it alone)."""
        per_micro = self.part_size * self.data_parallel  # parts micro * dp ... (micro + 1) * dp - 1, contiguous
        mine = self.planner.experts  # under expert parallel: this rank's, named by their index among them
        return [[active[(active >= mine.start) & (active < mine.stop)] - mine.start
                 for active in self.planner.active_experts(tokens[micro * per_micro:(micro + 1) * per_micro, :-1],
                                                           domains[micro * per_micro:(micro + 1) * per_micro])]
                for micro in range(self.accumulation_steps)]

    def _block_rows(self, micro: int) -> np.ndarray:
        """The rows of micro-batch ``micro`` of every data shard of this rank's expert block, in shard order."""
        first = self.rank - self.rank % self.expert_parallel
        return np.concatenate([np.arange(part * self.part_size, (part + 1) * self.part_size)
                               for part in range(micro * self.data_parallel + first,
                                                 micro * self.data_parallel + first + self.expert_parallel)])

    def read(self, step: int, position: int) -> StepBatch:
        tokens, domains = self.source.read(position, self.batch_size)
        total = predicted_tokens(tokens, self.eod_token_id)
        normaliser = Tensor(float(total), ms.float32)
        parts = [micro * self.data_parallel + self.rank for micro in range(self.accumulation_steps)]
        rows = [slice(part * self.part_size, (part + 1) * self.part_size) for part in parts]
        plans = None
        if self.planner is not None:
            block = [self._block_rows(micro) for micro in range(self.accumulation_steps)]
            plans = [self.planner.plan(tokens[r, :-1], domains[r]) for r in block]
        if plans is not None and self.stage_plans is not None:
            plans = self.stage_plans(plans, tokens[block[0], :-1].size, self._micro_experts(tokens, domains))
        micro_batches = []
        for micro, part in enumerate(parts):
            inputs = [Tensor(tokens[rows[micro]]), Tensor(domains[rows[micro]]), normaliser]
            if self.planner is not None or self.dropout:
                inputs.append(None if plans is None else Tensor(plans[micro]))
            if self.dropout:
                inputs.append(Tensor(dropout_seed(self.base_seed, step, part), ms.int64))
            micro_batches.append(tuple(inputs))
        return StepBatch(micro_batches, total, position + self.batch_size)


class PrefetchingReader:
    """Reads step t+1's batch in a background thread while step t runs (``ecss.prefetch``).

    Reads stay in order, one at a time: ``prefetch`` is only called once the previous batch was
    taken, so the data source and the RRE planner never run concurrently with themselves.
    """

    def __init__(self, reader: GlobalBatchReader):
        self.reader = reader
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: Optional[Tuple[int, int, "Future[StepBatch]"]] = None

    def read(self, step: int, position: int) -> StepBatch:
        if self._ahead is not None and self._ahead[:2] == (step, position):
            batch = self._ahead[2].result()
            self._ahead = None
            return batch
        return self.reader.read(step, position)

    def prefetch(self, step: int, position: int) -> None:
        self._ahead = (step, position, self._pool.submit(self.reader.read, step, position))

    def close(self) -> None:
        """Wait for a read in flight (it may hold the data source) and stop the thread."""
        self._pool.shutdown(wait=True)


@contextlib.contextmanager
def prefetching(reader: GlobalBatchReader, enabled: bool) -> Iterator[Union[GlobalBatchReader, PrefetchingReader]]:
    """``reader``, or a :class:`PrefetchingReader` around it that is closed however the run ends."""
    if not enabled:
        yield reader
        return
    ahead = PrefetchingReader(reader)
    try:
        yield ahead
    finally:
        ahead.close()
