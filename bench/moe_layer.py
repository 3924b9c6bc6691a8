"""One sparse layer alone: RRE (host-planned) against learned top-1 and top-2, on this machine.

Usage: python bench/moe_layer.py --config ascend_configs/bench_t1_cpu.yaml --out bench/results/moe_layer_t1.json

Each variant is the layer's forward + backward + AdamWeightDecay update in one GRAPH-mode
cell, at the config's shapes (batch x seq tokens, hidden, FFN, experts), on batches whose
samples draw their domain at random (so domain mixes are uneven, as in training).  Rounds
interleave the variants so that machine noise hits them alike.  Learned routers use
capacity factor ``--capacity-factor`` (dropping); RRE is dropless.  Reported per variant:
tokens/s, expert rows computed per token (padding), dropped assignments.
"""

from __future__ import annotations

import argparse
import sys
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from record import write_record

from mindformers_sigma.config import apply_overrides, load_config
from mindformers_sigma.model.pangu_sigma import build_routing_tables
from mindformers_sigma.moe.expert_plan import ExpertPlanner, padding_ratio
from mindformers_sigma.moe.moe_layer import MoELayer


class LayerObjective(nn.Cell):
    """sum(layer(x) * probe) + aux: a loss whose gradient reaches every routed row."""

    def __init__(self, layer: MoELayer, probe: Tensor):
        super().__init__()
        self.layer = layer
        self.probe = probe

    def construct(self, hidden, token_ids, domain_ids, expert_plan=None):
        out, aux_loss, _ = self.layer(hidden, token_ids, domain_ids, expert_plan)
        return (out * self.probe).sum() + aux_loss


def build_variant(config, router: str, capacity_factor, probe: Tensor):
    moe = [f"moe.router={router}", f"moe.capacity_factor={'null' if capacity_factor is None else capacity_factor}"]
    variant = apply_overrides(config, moe)
    table = build_routing_tables(variant)[0] if router == "rre" else None
    layer = MoELayer(variant.model, variant.moe, table)
    objective = LayerObjective(layer, probe)
    step = nn.TrainOneStepCell(objective, nn.AdamWeightDecay(objective.trainable_params(), 1e-4))
    planner = ExpertPlanner([table], variant.moe.num_experts) if router == "rre" else None
    return step, planner, variant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config = apply_overrides(load_config(args.config), args.set)
    m, moe = config.model, config.moe
    batch, seq = config.train.batch_size, m.seq_length
    rng = np.random.default_rng(0)
    probe = Tensor(rng.standard_normal((batch, seq, m.hidden_size)).astype(np.float32))
    hidden = Tensor(rng.standard_normal((batch, seq, m.hidden_size)).astype(np.float32))
    batches = [(rng.integers(0, m.vocab_size, (batch, seq)).astype(np.int32),
                rng.integers(0, moe.num_domains, batch).astype(np.int32)) for _ in range(args.steps)]
    variants = {"rre": ("rre", None), "top1": ("switch", args.capacity_factor), "top2": ("gshard", args.capacity_factor)}
    built, results = {}, {}
    for name, (router, factor) in variants.items():
        step, planner, variant = build_variant(config, router, factor, probe)
        if planner is not None:
            step.set_inputs(Tensor(shape=[batch, seq, m.hidden_size], dtype=ms.float32),
                            Tensor(shape=[batch, seq], dtype=ms.int32), Tensor(shape=[batch], dtype=ms.int32),
                            Tensor(shape=[None, None], dtype=ms.int32))
        inputs = []
        for ids, domains in batches:
            extra = (Tensor(planner.plan(ids, domains)[0]),) if planner else ()
            inputs.append((hidden, Tensor(ids), Tensor(domains)) + extra)
        started = time.perf_counter()
        step(*inputs[0]).asnumpy()
        rows = ([padding_ratio(planner.plan(ids, d), ids.size) for ids, d in batches] if planner
                else [variant.moe.top_k * factor])
        built[name] = (step, inputs)
        results[name] = {"router": router, "top_k": variant.moe.top_k, "capacity_factor": factor,
                         "compile_seconds": time.perf_counter() - started, "seconds": [],
                         "expert_rows_per_token": float(np.mean(rows))}
    for _ in range(args.rounds):
        for name, (step, inputs) in built.items():
            started = time.perf_counter()
            for item in inputs:
                loss = step(*item)
            loss.asnumpy()
            results[name]["seconds"].append((time.perf_counter() - started) / len(inputs))
    tokens = batch * seq
    for name, result in results.items():
        result["step_seconds"] = float(np.median(result["seconds"]))
        result["tokens_per_second"] = tokens / result["step_seconds"]
    base = results["top1"]["tokens_per_second"]
    for result in results.values():
        result["speed_vs_top1"] = result["tokens_per_second"] / base
    write_record(args.out, {"benchmark": "moe_layer", "config": args.config, "overrides": args.set,
                            "tokens_per_step": tokens, "hidden": m.hidden_size, "ffn": m.ffn_hidden_size,
                            "experts": moe.num_experts, "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
