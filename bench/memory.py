"""Peak memory (RSS) of training steps: one layer against tokens per step, and whole configs.

Usage: python bench/memory.py --config ascend_configs/bench_t4_cpu.yaml --out bench/results/memory_t4.json

Every case runs in a fresh process (peak RSS only grows), three steps of forward + backward
+ update in GRAPH mode.  Layer cases take the config's shapes (hidden, FFN, experts) for a
dense FFN, the RRE layer (host-planned) and learned top-1/top-2 layers (capacity factor
1.25), at 512..4096 tokens per step; ``growth_mb`` is the peak minus the peak RSS before the
first step (weights and optimizer state included).  Whole-config cases train ``--train-steps``
steps through the trainer and report its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from record import write_record

from mindformers_sigma.config import apply_overrides, load_config

SEQ = 256
TOKENS = (512, 1024, 2048, 4096)
LAYERS = ("dense", "rre", "top1", "top2")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_layer_case(config_path: str, overrides: list, kind: str, tokens: int) -> dict:
    """One layer, ``tokens`` per step: peak RSS and its growth over the built model's."""
    from moe_layer import build_variant

    from mindformers_sigma.model.feed_forward import FeedForward

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config = apply_overrides(load_config(config_path), overrides)
    m, batch = config.model, tokens // SEQ
    rng = np.random.default_rng(0)
    probe = Tensor(rng.standard_normal((batch, SEQ, m.hidden_size)).astype(np.float32))
    hidden = Tensor(rng.standard_normal((batch, SEQ, m.hidden_size)).astype(np.float32))
    ids = rng.integers(0, m.vocab_size, (batch, SEQ)).astype(np.int32)
    domains = rng.integers(0, config.moe.num_domains, batch).astype(np.int32)
    inputs = (hidden, Tensor(ids), Tensor(domains))
    if kind == "dense":
        objective = _DenseObjective(FeedForward(m.hidden_size, m.ffn_hidden_size, m.init_std), probe)
        step = nn.TrainOneStepCell(objective, nn.AdamWeightDecay(objective.trainable_params(), 1e-4))
        inputs = (hidden,)
    else:
        router, factor = {"rre": ("rre", None), "top1": ("switch", 1.25), "top2": ("gshard", 1.25)}[kind]
        step, planner, _ = build_variant(config, router, factor, probe)
        if planner is not None:
            inputs += (Tensor(planner.plan(ids, domains)[0]),)
    before = _rss_mb()
    for _ in range(3):
        step(*inputs).asnumpy()
    return {"case": kind, "tokens": tokens, "peak_rss_mb": _rss_mb(), "growth_mb": _rss_mb() - before}


class _DenseObjective(nn.Cell):
    def __init__(self, layer, probe):
        super().__init__()
        self.layer = layer
        self.probe = probe

    def construct(self, hidden):
        return (self.layer(hidden) * self.probe).sum()


def run_config_case(config_path: str, overrides: list, steps: int) -> dict:
    from mindformers_sigma.training.trainer import train

    config = apply_overrides(load_config(config_path), overrides)
    summary = train(config, steps=steps, log=lambda line: print(line, file=sys.stderr))
    return {"case": "train", "config": config_path, "overrides": overrides,
            "tokens": config.train.batch_size * config.model.seq_length, "peak_rss_mb": summary.peak_rss_mb,
            "tokens_per_second": summary.tokens_per_second, "compile_seconds": summary.compile_seconds}


def _in_fresh_process(case: list) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case-json", json.dumps(case)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        return {"case": case, "failed": done.returncode, "stderr_tail": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="layer shapes (hidden, FFN, experts) come from here")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--train-config", action="append", default=[], help="whole configs to train (repeatable)")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--out")
    parser.add_argument("--case-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case_json:
        kind, *rest = json.loads(args.case_json)
        result = run_config_case(*rest) if kind == "train" else run_layer_case(*rest)
        print(json.dumps(result))
        return 0
    if not args.out:
        parser.error("--out is required")
    layers = [_in_fresh_process(["layer", args.config, args.set, kind, tokens])
              for kind in LAYERS for tokens in TOKENS] if args.config else []
    configs = [_in_fresh_process(["train", path, [], args.train_steps]) for path in args.train_config]
    write_record(args.out, {"benchmark": "memory", "config": args.config, "overrides": args.set,
                            "layers": layers, "configs": configs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
