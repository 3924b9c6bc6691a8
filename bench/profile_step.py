"""Where a training step's time goes: forward+backward of each part, compiled alone, on one config.

Usage: python bench/profile_step.py --config ascend_configs/bench_t1_cpu.yaml --out bench/results/profile_t1.json
Parts: embedding, one dense layer, one sparse (RRE) layer, the top query layer, the tied head
with the loss, and the optimizer update; plus the whole fused step for comparison, and the
whole step's kernel time by op type (MindSpore's CPU profiler).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tempfile
import time
from typing import List

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from record import write_record

from mindformers_sigma.config import apply_overrides, load_config
from mindformers_sigma.context import configure_context
from mindformers_sigma.data.synthetic import SyntheticSource
from mindformers_sigma.training.global_batch import predicted_tokens
from mindformers_sigma.training.metrics import flops_per_token, measure_matmul_peak
from mindformers_sigma.moe.expert_plan import padding_ratio
from mindformers_sigma.training.trainer import build_train_step, expert_planner


class _GradOf(nn.Cell):
    """fn(*inputs) summed, differentiated w.r.t. the part's weights and its float inputs."""

    def __init__(self, part: nn.Cell, forward):
        super().__init__(auto_prefix=False)
        self.part = part
        self.forward = forward
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)
        self.weights = ms.ParameterTuple(part.trainable_params())

    def construct(self, *inputs):
        return self.grad(self.forward, self.weights)(*inputs)


def _wait(out) -> None:
    """Block until every tensor in a (nested) output is computed."""
    for leaf in out if isinstance(out, tuple) else (out,):
        if isinstance(leaf, tuple):
            _wait(leaf)
        elif hasattr(leaf, "asnumpy"):
            leaf.asnumpy()


def _time(cell, inputs, repeats):
    """Seconds per call after one warm-up (compiling) call."""
    _wait(cell(*inputs))
    start = time.perf_counter()
    for _ in range(repeats):
        out = cell(*inputs)
    _wait(out)
    return (time.perf_counter() - start) / repeats


def op_type_profile(cell: nn.Cell, inputs, repeats: int) -> List[dict]:
    """MindSpore's CPU profiler over ``repeats`` calls of the whole step: milliseconds per step and
    share of all kernel time for each op type, largest first."""
    with tempfile.TemporaryDirectory() as folder:
        profiler = ms.Profiler(output_path=folder)
        for _ in range(repeats):
            out = cell(*inputs)
        _wait(out)
        profiler.analyse()
        (table,) = glob.glob(os.path.join(folder, "**", "cpu_op_type_info_*.csv"), recursive=True)
        with open(table, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    total = sum(float(row["total_compute_time"]) for row in rows)
    found = [{"op_type": row["op_type"], "ms_per_step": float(row["total_compute_time"]) / repeats,
              "calls_per_step": int(row["execution_frequency(per-step)"]),
              "share": float(row["total_compute_time"]) / total} for row in rows]
    return sorted(found, key=lambda row: -row["share"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    configure_context(config)
    m = config.model
    step = build_train_step(config, None, 1)
    network = step.forward_backward.loss_cell.network
    backbone = network.backbone
    tokens, domains = SyntheticSource(m.vocab_size, m.seq_length, config.moe.num_domains, m.eod_token_id, 0).read(
        0, config.train.batch_size)
    tokens_t, domains_t = Tensor(tokens), Tensor(domains)
    planner = expert_planner(config, step)
    plan = planner.plan(tokens[:, :-1], domains) if planner else None
    token_total = Tensor(float(predicted_tokens(tokens, m.eod_token_id)), ms.float32)
    step_inputs = (tokens_t, domains_t, token_total) + ((Tensor(plan),) if planner else ())
    input_ids = Tensor(tokens[:, :-1])
    position_ids, bias = backbone.eod_reset(input_ids)
    hidden = backbone.embedding(input_ids, position_ids)
    query_hidden = backbone.top_query_embedding(position_ids)

    class Layer(nn.Cell):
        def __init__(self, layer, query, sparse_index=None):
            super().__init__(auto_prefix=False)
            self.layer = layer
            self.query = query
            self.plan = Tensor(plan[sparse_index]) if plan is not None and sparse_index is not None else None

        def construct(self, x):
            if self.query:
                out = self.layer(x, bias, input_ids, domains_t, query_hidden, self.plan)
            else:
                out = self.layer(x, bias, input_ids, domains_t, None, self.plan)
            return out[0].sum()

    class Head(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.network = network

        def construct(self, x):
            logits = ops.matmul(x.reshape((-1, m.hidden_size)), network.backbone.embedding.word.embedding_table.T)
            return ops.log_softmax(logits, -1).mean()

    class Embed(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.embedding = backbone.embedding

        def construct(self, ids):
            return self.embedding(ids, position_ids).sum()

    parts = {}
    dense = Layer(backbone.layers[0], False)
    sparse = Layer(backbone.layers[m.dense_layers], False, 0) if m.sparse_layers > 1 else None
    query = Layer(backbone.top_query_layer, True, m.sparse_layers - 1 if m.sparse_layers else None)
    parts["embedding"] = (_GradOf(Embed(), Embed()), (input_ids,), 1)
    parts["dense_layer"] = (_GradOf(dense, dense), (hidden,), m.dense_layers)
    if sparse is not None:
        parts["sparse_layer"] = (_GradOf(sparse, sparse), (hidden,), m.sparse_layers - 1)
    parts["top_query_layer"] = (_GradOf(query, query), (hidden,), 1)
    parts["head_and_loss"] = (_GradOf(Head(), Head()), (hidden,), 1)
    grads = tuple(Tensor(np.zeros(p.shape, np.float32)) for p in step.apply_gradients.optimizer.parameters)
    parts["optimizer_update"] = (step.apply_gradients, (grads,), 1)

    record = {"benchmark": "profile_step", "config": args.config, "overrides": args.set, "parts": {},
              "expert_rows_per_token": padding_ratio(plan, tokens[:, :-1].size) if planner else None}
    total_parts = 0.0
    for name, (cell, inputs, count) in parts.items():
        seconds = _time(cell, inputs, args.repeats)
        record["parts"][name] = {"seconds_each": seconds, "count": count, "seconds_total": seconds * count}
        total_parts += seconds * count
    whole = _time(step, step_inputs, args.repeats)
    peak = measure_matmul_peak()
    tokens_per_second = config.train.batch_size * m.seq_length / whole
    record.update(step_seconds=whole, sum_of_parts_seconds=total_parts, tokens_per_second=tokens_per_second,
                  peak_flops=peak, mfu=tokens_per_second * flops_per_token(config) / peak)
    for part in record["parts"].values():
        part["share_of_sum"] = part["seconds_total"] / total_parts
    record["op_types"] = op_type_profile(step, step_inputs, args.repeats)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
