"""Run under msrun by ``pangu-sigma bench parallel``: one training step of one rank, in PyNative mode,
with every AllReduce and AllGather counted by process-group kind.

Counting wraps the collective primitives' Python call, which PyNative makes for every collective
of the forward pass, of the layers' backward (``GroupSum.bprop``), of the gradient sums and of the
update; so the counts are what the step really hands to the collectives, not a formula.
Usage: collective_count.py CONFIG OUT [--set KEY=VALUE ...]; writes ``OUT/rank_R.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter

from mindspore import ops
from mindspore.communication import GlobalComm

from mindformers_sigma.config import apply_overrides, load_config
from mindformers_sigma.context import configure_context
from mindformers_sigma.training.global_batch import GlobalBatchReader
from mindformers_sigma.training.train_step import run_step
from mindformers_sigma.training.trainer import aux_loss_coef, build_train_step, expert_planner
from mindformers_sigma.training.training_data import open_training_data

# group name prefixes (distributed/topology.py) -> the kinds of parallel/collective_volume.py
KIND_OF_PREFIX = {"dp_": "data", "mp_": "model", "ep_": "expert", "epmp_": "expert_model", "edp_": "expert_data"}


def kind_of(group: str) -> str:
    if group == GlobalComm.WORLD_COMM_GROUP:
        return "world"
    return next(kind for prefix, kind in KIND_OF_PREFIX.items() if group.startswith(prefix))


def count_collectives(counts: Counter) -> None:
    """Make every AllReduce and AllGather add its input's bytes to ``counts[kind]``."""
    for primitive in (ops.AllReduce, ops.AllGather):
        call = primitive.__call__

        def counted(self, x, *args, _call=call):
            counts[kind_of(self.group)] += x.nbytes
            return _call(self, x, *args)

        primitive.__call__ = counted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    config = dataclasses.replace(config, context=dataclasses.replace(config.context, mode="pynative"))
    parallel = configure_context(config)
    topology = parallel.topology
    data = open_training_data(config)
    step_cell = build_train_step(config, data.token_frequency, topology)
    train = config.train
    reader = GlobalBatchReader(data.source, train.batch_size, topology.data_parallel, topology.data_index,
                               train.grad_accumulation_steps, config.model.eod_token_id,
                               expert_planner(config, step_cell, topology), config.context.seed,
                               config.model.dropout_rate > 0, None, topology.expert_parallel)
    batch = reader.read(0, 0)
    counts: Counter = Counter()
    count_collectives(counts)
    run_step(step_cell, batch.micro_batches, batch.token_total, aux_loss_coef(config),
             topology.data_parallel * train.grad_accumulation_steps)
    parallel.any_rank(False)  # the trainer's per-step stop vote
    with open(f"{args.out}/rank_{topology.rank}.json", "w", encoding="utf-8") as handle:
        json.dump(dict(counts), handle)


if __name__ == "__main__":
    main()
