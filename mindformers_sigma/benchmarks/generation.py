"""``pangu-sigma bench generation``: decoding speed with and without the KV cache.

The tiny config (``pangu_sigma_tiny_cpu.yaml``) with ``model.seq_length`` raised so that 256 new
tokens fit after a prompt; weights at initialisation (speed does not depend on their values);
greedy decoding that does not stop at EOD, so every run makes exactly N tokens per row.
Batch 1 and 8, prompts of uneven lengths (left padding); decode tokens/s excludes the prefill
and graph compilation, and is the median of rounds that alternate the decoders (this machine's
speed drifts by 2x within a minute, so only ratios taken side by side mean anything).  Then one domain's extracted sub-model against the full model: parameter
count, weight bytes, and the same decoding speed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_record

TINY = Path(__file__).resolve().parents[2] / "ascend_configs" / "pangu_sigma_tiny_cpu.yaml"


def _prompts(batch: int, vocab: int, eod: int, rng: np.random.Generator) -> List[List[int]]:
    lengths = rng.integers(8, 33, batch)
    return [[int(t) for t in rng.integers(7, vocab, n) if t != eod] for n in lengths]


def _speeds(generators: Dict[str, object], prompts, new_tokens: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Each generator's decode and prefill speed, median over ``rounds`` rounds that alternate the generators,
    so that the machine's slow spells (they last seconds here) hit all of them alike."""
    from mindformers_sigma.generation.sampling import Sampling

    runs: Dict[str, List] = {name: [] for name in generators}
    for _ in range(rounds):
        for name, generator in generators.items():
            runs[name].append(generator.generate(prompts, 0, new_tokens, Sampling(), stop_at_eod=False))
    return {name: {"decode_tokens_per_s": float(np.median([r.decode_tokens_per_second for r in results])),
                   "prefill_tokens_per_s": float(np.median([r.prefill_tokens_per_second for r in results])),
                   "decode_steps": results[0].decode_steps, "rounds": rounds,
                   "compile_seconds": results[0].compile_seconds}
            for name, results in runs.items()}


def run(quick: bool, out_dir: str) -> dict:

    from mindformers_sigma.checkpoint.model import build_model, inference_config
    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.context import configure_context
    from mindformers_sigma.generation.generator import Generator
    from mindformers_sigma.lifecycle.extract import extract_domain
    from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM
    from mindformers_sigma.params import count_parameters

    check_out_dir(out_dir)
    new_tokens = 16 if quick else 256
    config = apply_overrides(load_config(TINY), [f"model.seq_length={new_tokens + 64}"])
    configure_context(inference_config(config))
    full = PanGuSigmaForCausalLM(inference_config(config))
    full.set_train(False)
    weights = {name: p.asnumpy() for name, p in full.parameters_and_names()}
    sub_config, sub_weights = extract_domain(config, weights, 0)
    sub = build_model(sub_config, sub_weights, "the extracted sub-model")
    model, eod = config.model, config.model.eod_token_id
    rng = np.random.default_rng(0)
    batches = {1: _prompts(1, model.vocab_size, eod, rng), 8: _prompts(8, model.vocab_size, eod, rng)}
    rounds = 1 if quick else 2
    decoding = {}
    for batch, prompts in batches.items():
        print(f"bench generate: batch {batch}, {new_tokens} new tokens, KV cache and full recompute alternating",
              file=sys.stderr, flush=True)
        speeds = _speeds({"kv_cache": Generator(full, model.seq_length, eod, True),
                          "no_cache": Generator(full, model.seq_length, eod, False)}, prompts, new_tokens, rounds)
        decoding[str(batch)] = dict(speeds, speedup=speeds["kv_cache"]["decode_tokens_per_s"] /
                                    speeds["no_cache"]["decode_tokens_per_s"])
    print("bench generate: extracted sub-model against the full model", file=sys.stderr, flush=True)
    speeds = _speeds({"full": Generator(full, model.seq_length, eod, True),
                      "sub_model": Generator(sub, model.seq_length, eod, True)}, batches[8], new_tokens, rounds + 1)
    sizes = {name: {"parameters": count_parameters(cfg).total, "weight_bytes": int(sum(a.nbytes for a in arrays.values())),
                    **speeds[name]}
             for name, cfg, arrays in (("full", config, weights), ("sub_model", sub_config, sub_weights))}
    record = {"benchmark": "generate", "quick": quick, "config": str(TINY), "overrides": [f"model.seq_length={model.seq_length}"],
              "new_tokens": new_tokens, "decoding": decoding, "extracted": sizes}
    write_record(os.path.join(out_dir, "generation.json"), record, echo=False)
    print(table(record))
    return record


def table(record: dict) -> str:
    decoding = markdown_table(
        ["batch", "KV cache decode tokens/s", "no-cache decode tokens/s", f"speedup ({record['new_tokens']} new tokens)"],
        ([batch, f"{row['kv_cache']['decode_tokens_per_s']:,.0f}", f"{row['no_cache']['decode_tokens_per_s']:,.0f}",
          f"{row['speedup']:.1f}x"] for batch, row in record["decoding"].items()))
    extracted = markdown_table(
        ["model", "parameters", "weight MiB", "prefill tokens/s (batch 8)", "decode tokens/s (batch 8)"],
        ([name.replace("_", " "), f"{row['parameters']:,}", f"{row['weight_bytes'] / 2 ** 20:.2f}",
          f"{row['prefill_tokens_per_s']:,.0f}", f"{row['decode_tokens_per_s']:,.0f}"]
         for name, row in record["extracted"].items()))
    return "\n".join(decoding + [""] + extracted)
