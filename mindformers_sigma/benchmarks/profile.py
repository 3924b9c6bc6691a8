"""``pangu-sigma bench profile``: where a T1 training step's time goes.

Each part's forward + backward is compiled and timed alone (the embedding, one dense layer, one
sparse RRE layer with the host's dispatch plan, the top query layer, the tied head with the loss,
the optimizer update), beside the whole fused step; then MindSpore's CPU profiler splits the whole
step's kernel time by op type.  Parts are timed on the trainer's own cells, so they are the
training graph's pieces, not re-implementations.
"""

from __future__ import annotations

import csv
import glob
import os
import tempfile
import time
from typing import List

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_part
from mindformers_sigma.benchmarks.training import QUICK, T1


def _wait(out) -> None:
    """Block until every tensor in a (nested) output is computed."""
    for leaf in out if isinstance(out, tuple) else (out,):
        if isinstance(leaf, tuple):
            _wait(leaf)
        elif hasattr(leaf, "asnumpy"):
            leaf.asnumpy()


def _seconds(cell, inputs, repeats: int) -> float:
    """Seconds per call after one warm-up (compiling) call."""
    _wait(cell(*inputs))
    start = time.perf_counter()
    for _ in range(repeats):
        out = cell(*inputs)
    _wait(out)
    return (time.perf_counter() - start) / repeats


def op_type_profile(cell, inputs, repeats: int) -> List[dict]:
    """MindSpore's CPU profiler over ``repeats`` calls: milliseconds per step and share of all kernel
    time for each op type, largest first."""
    import mindspore as ms

    with tempfile.TemporaryDirectory() as folder:
        profiler = ms.Profiler(output_path=folder)
        for _ in range(repeats):
            out = cell(*inputs)
        _wait(out)
        profiler.analyse()
        (found,) = glob.glob(os.path.join(folder, "**", "cpu_op_type_info_*.csv"), recursive=True)
        with open(found, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    total = sum(float(row["total_compute_time"]) for row in rows)
    return sorted(({"op_type": row["op_type"], "ms_per_step": float(row["total_compute_time"]) / repeats,
                    "calls_per_step": int(row["execution_frequency(per-step)"]),
                    "share": float(row["total_compute_time"]) / total} for row in rows), key=lambda row: -row["share"])


def _parts(config, step, tokens, domains, plan):
    """name -> (cell to time, its inputs, how many of it a step runs)."""
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    m = config.model
    network = step.forward_backward.loss_cell.network
    backbone = network.backbone
    input_ids, domain_ids = ms.Tensor(tokens[:, :-1]), ms.Tensor(domains)
    position_ids, bias = backbone.eod_reset(input_ids)
    hidden = backbone.embedding(input_ids, position_ids)
    query_hidden = backbone.top_query_embedding(position_ids)

    class Grad(nn.Cell):
        """The part's output summed, differentiated w.r.t. its weights and its float inputs."""

        def __init__(self, part):
            super().__init__(auto_prefix=False)
            self.part = part
            self.grad = ops.GradOperation(get_all=True, get_by_list=True)
            self.weights = ms.ParameterTuple(part.trainable_params())

        def construct(self, *inputs):
            return self.grad(self.part, self.weights)(*inputs)

    class Layer(nn.Cell):
        def __init__(self, layer, top: bool, sparse_index=None):
            super().__init__(auto_prefix=False)
            self.layer = layer
            self.query = query_hidden if top else None
            self.plan = ms.Tensor(plan[sparse_index]) if plan is not None and sparse_index is not None else None

        def construct(self, x):
            out = self.layer(x, bias, input_ids, domain_ids, query_hidden=self.query, expert_plan=self.plan)
            return out[0].sum()

    class HeadAndLoss(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.network = network

        def construct(self, x):
            return ops.log_softmax(self.network.vocabulary_logits(x.reshape((-1, m.hidden_size))), -1).mean()

    class Embed(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.embedding = backbone.embedding

        def construct(self, ids):
            return self.embedding(ids, position_ids).sum()

    parts = {"embedding": (Grad(Embed()), (input_ids,), 1),
             "dense_layer": (Grad(Layer(backbone.layers[0], False)), (hidden,), m.dense_layers)}
    if m.sparse_layers > 1:
        parts["sparse_layer"] = (Grad(Layer(backbone.layers[m.dense_layers], False, 0)), (hidden,),
                                 m.sparse_layers - 1)
    parts["top_query_layer"] = (Grad(Layer(backbone.top_query_layer, True, m.sparse_layers - 1 if m.sparse_layers
                                           else None)), (hidden,), 1)
    parts["head_and_loss"] = (Grad(HeadAndLoss()), (hidden,), 1)
    grads = tuple(ms.Tensor(np.zeros(p.shape, np.float32)) for p in step.apply_gradients.optimizer.parameters)
    parts["optimizer_update"] = (step.apply_gradients, (grads,), 1)
    return parts


def measure(quick: bool) -> dict:
    import mindspore as ms

    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.context import configure_context
    from mindformers_sigma.data.synthetic import SyntheticSource
    from mindformers_sigma.moe.expert_plan import padding_ratio
    from mindformers_sigma.params import flops_per_token
    from mindformers_sigma.training.global_batch import predicted_tokens
    from mindformers_sigma.training.metrics import measure_matmul_peak
    from mindformers_sigma.training.trainer import build_train_step, expert_planner

    config = apply_overrides(load_config(T1), QUICK if quick else [])
    configure_context(config)
    m, repeats = config.model, 1 if quick else 5
    step = build_train_step(config, None)
    tokens, domains = SyntheticSource(m.vocab_size, m.seq_length, config.moe.num_domains, m.eod_token_id, 0).read(
        0, config.train.batch_size)
    planner = expert_planner(config, step)
    plan = planner.plan(tokens[:, :-1], domains) if planner else None
    step_inputs = (ms.Tensor(tokens), ms.Tensor(domains),
                   ms.Tensor(float(predicted_tokens(tokens, m.eod_token_id)), ms.float32)) + \
        ((ms.Tensor(plan),) if plan is not None else ())
    parts = {}
    for name, (cell, inputs, count) in _parts(config, step, tokens, domains, plan).items():
        seconds = _seconds(cell, inputs, repeats)
        parts[name] = {"seconds_each": seconds, "count": count, "seconds_total": seconds * count}
    total = sum(part["seconds_total"] for part in parts.values())
    for part in parts.values():
        part["share_of_sum"] = part["seconds_total"] / total
    whole = _seconds(step, step_inputs, repeats)
    peak = measure_matmul_peak()
    tokens_per_s = config.train.batch_size * m.seq_length / whole
    return {"config": str(T1), "overrides": QUICK if quick else [], "parts": parts, "step_seconds": whole,
            "sum_of_parts_seconds": total, "tokens_per_s": tokens_per_s, "peak_gflops": peak / 1e9,
            "mfu": tokens_per_s * flops_per_token(config) / peak,
            "expert_rows_per_token": padding_ratio(plan, tokens[:, :-1].size) if plan is not None else None,
            "op_types": op_type_profile(step, step_inputs, repeats)}


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    return write_part(out_dir, "profile", quick, measure(quick))


def table(record: dict) -> str:
    lines = markdown_table(["part of a T1 step (forward + backward)", "s each", "x", "share of the parts"],
                           ([name, f"{part['seconds_each']:.3f}", str(part['count']), f"{part['share_of_sum']:.1%}"]
                            for name, part in record["parts"].items()))
    lines += ["", f"Whole fused step {record['step_seconds']:.3f} s (parts sum to {record['sum_of_parts_seconds']:.3f} "
                  f"s), {record['tokens_per_s']:,.0f} tokens/s, MFU {record['mfu']:.3f}.", ""]
    lines += markdown_table(["op type (CPU profiler)", "ms per step", "share of kernel time"],
                            ([row["op_type"], f"{row['ms_per_step']:.1f}", f"{row['share']:.1%}"]
                             for row in record["op_types"][:10]))
    return "\n".join(lines)
