"""``pangu-sigma bench moe_layer``: one sparse layer alone, RRE (host-planned, dropless) against learned
top-1 and top-2 (capacity factor 1.25), at the T1 shapes.

Each variant is the layer's forward + backward + AdamWeightDecay update in one GRAPH-mode cell, on
batches whose samples draw their domain at random (uneven domain mixes, as in training).  Rounds
interleave the variants so that machine noise hits them alike; each variant's figure is the median
round.  Reported per variant: tokens/s, expert rows computed per token (padding), and the ratio to top-1.
"""

from __future__ import annotations

import time

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_part
from mindformers_sigma.benchmarks.training import QUICK, T1

CAPACITY_FACTOR = 1.25
VARIANTS = {"rre": ("rre", None), "top1": ("switch", CAPACITY_FACTOR), "top2": ("gshard", CAPACITY_FACTOR)}


def layer_step(config, router: str, capacity_factor, probe):
    """(train step of one sparse layer, its RRE planner or None, the variant's config)."""
    import mindspore as ms
    from mindspore import nn

    from mindformers_sigma.config import apply_overrides
    from mindformers_sigma.model.pangu_sigma import build_routing_tables
    from mindformers_sigma.moe.expert_plan import ExpertPlanner
    from mindformers_sigma.moe.moe_layer import MoELayer

    class Objective(nn.Cell):
        """sum(layer(x) * probe) + aux: a loss whose gradient reaches every routed row."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            self.probe = probe

        def construct(self, hidden, token_ids, domain_ids, expert_plan=None):
            out, aux_loss, _ = self.layer(hidden, token_ids, domain_ids, expert_plan)
            return (out * self.probe).sum() + aux_loss

    variant = apply_overrides(config, [f"moe.router={router}", "moe.capacity_factor="
                                       + ("null" if capacity_factor is None else str(capacity_factor))])
    tables = build_routing_tables(variant)
    objective = Objective(MoELayer(variant.model, variant.moe, tables[0] if tables else None))
    step = nn.TrainOneStepCell(objective, nn.AdamWeightDecay(objective.trainable_params(), 1e-4))
    planner = ExpertPlanner(tables[:1], variant.moe.num_experts) if tables else None
    if planner is not None:  # the plan's slots and rows vary by batch: one graph for all
        batch, seq, width = probe.shape
        step.set_inputs(ms.Tensor(shape=[batch, seq, width], dtype=ms.float32),
                        ms.Tensor(shape=[batch, seq], dtype=ms.int32), ms.Tensor(shape=[batch], dtype=ms.int32),
                        ms.Tensor(shape=[None, None], dtype=ms.int32))
    return step, planner, variant


def measure(quick: bool) -> dict:
    import mindspore as ms
    import numpy as np

    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.moe.expert_plan import padding_ratio

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config = apply_overrides(load_config(T1), QUICK if quick else [])
    m, moe = config.model, config.moe
    batch, seq = config.train.batch_size, m.seq_length
    steps, rounds = (2, 1) if quick else (10, 3)
    rng = np.random.default_rng(0)
    probe = ms.Tensor(rng.standard_normal((batch, seq, m.hidden_size)).astype(np.float32))
    hidden = ms.Tensor(rng.standard_normal((batch, seq, m.hidden_size)).astype(np.float32))
    batches = [(rng.integers(0, m.vocab_size, (batch, seq)).astype(np.int32),
                rng.integers(0, moe.num_domains, batch).astype(np.int32)) for _ in range(steps)]
    built, results = {}, {}
    for name, (router, factor) in VARIANTS.items():
        step, planner, variant = layer_step(config, router, factor, probe)
        inputs = [(hidden, ms.Tensor(ids), ms.Tensor(domains))
                  + ((ms.Tensor(planner.plan(ids, domains)[0]),) if planner else ()) for ids, domains in batches]
        started = time.perf_counter()
        step(*inputs[0]).asnumpy()
        rows = ([padding_ratio(planner.plan(ids, domains), ids.size) for ids, domains in batches] if planner
                else [variant.moe.top_k * factor])
        built[name] = (step, inputs)
        results[name] = {"router": router, "top_k": variant.moe.top_k, "capacity_factor": factor,
                         "compile_seconds": time.perf_counter() - started, "seconds": [],
                         "expert_rows_per_token": float(np.mean(rows))}
    for _ in range(rounds):
        for name, (step, inputs) in built.items():
            started = time.perf_counter()
            for item in inputs:
                loss = step(*item)
            loss.asnumpy()
            results[name]["seconds"].append((time.perf_counter() - started) / len(inputs))
    for result in results.values():
        result["step_seconds"] = float(np.median(result["seconds"]))
        result["tokens_per_s"] = batch * seq / result["step_seconds"]
    for result in results.values():
        result["speed_vs_top1"] = result["tokens_per_s"] / results["top1"]["tokens_per_s"]
    return {"config": str(T1), "overrides": QUICK if quick else [], "tokens_per_step": batch * seq,
            "hidden": m.hidden_size, "ffn": m.ffn_hidden_size, "experts": moe.num_experts, "steps": steps,
            "rounds": rounds, "variants": results}


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    return write_part(out_dir, "moe_layer", quick, measure(quick))


def table(record: dict) -> str:
    return "\n".join(markdown_table(
        [f"one sparse layer ({record['tokens_per_step']:,} tokens, {record['experts']} experts)", "tokens/s",
         "vs learned top-1", "expert rows per token"],
        ([name, f"{row['tokens_per_s']:,.0f}", f"{row['speed_vs_top1']:.2f}x", f"{row['expert_rows_per_token']:.2f}"]
         for name, row in record["variants"].items())))
