"""Run under msrun by tests/test_distributed.py: one rank's collectives and first-step gradients.

Each rank writes ``OUT/rank_R.npz``; the test checks everything against numpy and against one
process, so no assertion lives here.  Usage: distributed_worker.py OUT CONFIG [CONFIG ...] (the same
layout; each config's gradients are stored under ``grad<i>:NAME``).
"""

from __future__ import annotations

import sys

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.communication import GlobalComm

from mindformers_sigma.config import load_config
from mindformers_sigma.context import configure_context
from mindformers_sigma.distributed.collectives import ALL_GATHER, ALL_REDUCE, GroupGather, GroupSum
from mindformers_sigma.training.global_batch import GlobalBatchReader
from mindformers_sigma.training.trainer import build_train_step, expert_planner
from mindformers_sigma.training.training_data import open_training_data


class Scaled(nn.Cell):
    """``sum(op(x) * weight)``: its gradient with respect to ``x`` is the op's backward of ``weight``."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x, weight):
        return (self.op(x) * weight).sum()


def collectives(topology) -> dict:
    found = {}
    rank = topology.rank
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3) * (rank + 1))
    weight = Tensor(np.full((2, 3), rank + 1.0, np.float32))
    groups = {"data": topology.data_group(), "model": topology.model_group(), "expert": topology.expert_group(),
              "expert_model": topology.expert_model_group(), "expert_data": topology.expert_data_group()}
    for forward in groups:
        for backward in groups:
            op = GroupSum(groups[forward][0] if len(groups[forward][1]) > 1 else None,
                          groups[backward][0] if len(groups[backward][1]) > 1 else None)
            found[f"sum_{forward}_{backward}"] = op(x).asnumpy()
            found[f"grad_{forward}_{backward}"] = ops.grad(Scaled(op), 0)(x, weight).asnumpy()
    world = topology.world_size
    for form in (ALL_REDUCE, ALL_GATHER):
        found[f"gather_world_{form}"] = GroupGather(GlobalComm.WORLD_COMM_GROUP, world, rank, form)(x).asnumpy()
    model = groups["model"]
    found["gather_model"] = GroupGather(model[0], len(model[1]), topology.model_index)(x).asnumpy()
    return found


def first_gradients(config, topology, prefix: str) -> dict:
    data = open_training_data(config)
    step_cell = build_train_step(config, data.token_frequency, topology)
    train = config.train
    reader = GlobalBatchReader(data.source, train.batch_size, topology.data_parallel, topology.data_index,
                               train.grad_accumulation_steps, config.model.eod_token_id,
                               expert_planner(config, step_cell, topology), config.context.seed,
                               config.model.dropout_rate > 0, None, topology.expert_parallel)
    tokens, domains, *rest = reader.read(0, 0).micro_batches[0]
    _, grads = step_cell.forward_backward(tokens, domains, Tensor(1.0, ms.float32), *rest)
    names = [p.name for p in step_cell.apply_gradients.optimizer.parameters]
    return {f"{prefix}:{name}": grad.asnumpy() for name, grad in zip(names, grads)}


def main() -> None:
    out, paths = sys.argv[1], sys.argv[2:]
    configs = [load_config(path) for path in paths]
    topology = configure_context(configs[0]).topology
    found = collectives(topology)
    for index, config in enumerate(configs):
        found.update(first_gradients(config, topology, f"grad{index}"))
    np.savez(f"{out}/rank_{topology.rank}.npz", **found)


if __name__ == "__main__":
    main()
