"""``pangu-sigma bench memory``: peak memory (RSS) of training, for one layer against tokens per step
and for a whole config (T4, ``ascend_configs/bench_t4_cpu.yaml``).

Every case runs in a fresh process (peak RSS only grows): three steps of forward + backward + update
in GRAPH mode.  Layer cases take T4's shapes (hidden, FFN, experts) for a dense FFN, the RRE layer
(host-planned) and learned top-1/top-2 layers (capacity factor 1.25) at 512..4096 tokens per step;
``growth_mb`` is the peak minus the peak before the first step (weights and optimizer state
included in the peak, not in the growth).  The whole-config case trains through the trainer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from mindformers_sigma.benchmarks.moe_layer import VARIANTS, layer_step
from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_part
from mindformers_sigma.benchmarks.training import QUICK
from mindformers_sigma.errors import UserError

T4 = Path(__file__).resolve().parents[2] / "ascend_configs" / "bench_t4_cpu.yaml"
SEQ = 256
LAYERS = ("dense", *VARIANTS)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def layer_case(overrides: List[str], kind: str, tokens: int) -> dict:
    """One layer, ``tokens`` per step: peak RSS and its growth over the built layer's."""
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.model.feed_forward import FeedForward

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config = apply_overrides(load_config(T4), overrides)
    m, batch, seq = config.model, max(1, tokens // SEQ), min(SEQ, tokens)
    rng = np.random.default_rng(0)
    probe = ms.Tensor(rng.standard_normal((batch, seq, m.hidden_size)).astype(np.float32))
    hidden = ms.Tensor(rng.standard_normal((batch, seq, m.hidden_size)).astype(np.float32))
    ids = rng.integers(0, m.vocab_size, (batch, seq)).astype(np.int32)
    domains = rng.integers(0, config.moe.num_domains, batch).astype(np.int32)
    if kind == "dense":
        class Objective(nn.Cell):
            def __init__(self):
                super().__init__()
                self.layer = FeedForward(m.hidden_size, m.ffn_hidden_size, m.init_std)

            def construct(self, x):
                return (self.layer(x) * probe).sum()

        objective = Objective()
        step = nn.TrainOneStepCell(objective, nn.AdamWeightDecay(objective.trainable_params(), 1e-4))
        inputs = (hidden,)
    else:
        step, planner, _ = layer_step(config, *VARIANTS[kind], probe)
        inputs = (hidden, ms.Tensor(ids), ms.Tensor(domains))
        if planner is not None:
            inputs += (ms.Tensor(planner.plan(ids, domains)[0]),)
    before = _peak_rss_mb()
    for _ in range(3):
        step(*inputs).asnumpy()
    return {"case": kind, "tokens": batch * seq, "peak_rss_mb": _peak_rss_mb(), "growth_mb": _peak_rss_mb() - before}


def config_case(overrides: List[str], steps: int) -> dict:
    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.training.trainer import train

    config = apply_overrides(load_config(T4), overrides + ["train.peak_flops=1.0e11"])
    summary = train(config, steps=steps, log=lambda line: print(line, file=sys.stderr))
    return {"case": "train", "config": str(T4), "tokens": config.train.batch_size * config.model.seq_length,
            "peak_rss_mb": summary.peak_rss_mb, "tokens_per_s": summary.tokens_per_second,
            "compile_seconds": summary.compile_seconds}


def _in_fresh_process(case: list) -> dict:
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma.benchmarks.memory", "--case", json.dumps(case)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"bench memory: case {case} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    shrink = QUICK if quick else []
    tokens = (64, 128) if quick else (512, 1024, 2048, 4096)
    layers = [_in_fresh_process(["layer", shrink, kind, count]) for kind in LAYERS for count in tokens]
    whole = _in_fresh_process(["train", shrink, 2 if quick else 4])
    return write_part(out_dir, "memory", quick, {"config": str(T4), "overrides": shrink, "layers": layers,
                                                 "train": whole})


def table(record: dict) -> str:
    tokens = sorted({row["tokens"] for row in record["layers"]})
    growth = {(row["case"], row["tokens"]): row["growth_mb"] for row in record["layers"]}
    lines = markdown_table(["layer: RSS growth over 3 steps, MB"] + [f"{count:,} tokens" for count in tokens],
                           ([kind] + [f"{growth[kind, count]:,.0f}" for count in tokens] for kind in LAYERS))
    whole = record["train"]
    lines += ["", f"Whole config ({Path(whole['config']).name}, {whole['tokens']:,} tokens per step): peak RSS "
                  f"{whole['peak_rss_mb']:,.0f} MB, {whole['tokens_per_s']:,.0f} tokens/s."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child-process entry: one case, its JSON result as the last stdout line."""
    parser = argparse.ArgumentParser(description="one case of `pangu-sigma bench memory`")
    parser.add_argument("--case", required=True)
    kind, *rest = json.loads(parser.parse_args(argv).case)
    print(json.dumps(config_case(*rest) if kind == "train" else layer_case(*rest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
