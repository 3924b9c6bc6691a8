"""``pangu-sigma bench generate`` (also ``python bench/generate.py``): decoding speed with and without the KV cache.

The tiny config (``pangu_sigma_tiny_cpu.yaml``) with ``model.seq_length`` raised so that 256 new
tokens fit after a prompt; weights at initialisation (speed does not depend on their values);
greedy decoding that does not stop at EOD, so every run makes exactly N tokens per row.
Batch 1 and 8, prompts of uneven lengths (left padding); decode tokens/s excludes the prefill
and graph compilation.  Then one domain's extracted sub-model against the full model: parameter
count, weight bytes, and the same decoding speed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from mindformers_sigma.benchmarks.record import check_out_dir, write_record

TINY = Path(__file__).resolve().parents[2] / "ascend_configs" / "pangu_sigma_tiny_cpu.yaml"


def _prompts(batch: int, vocab: int, eod: int, rng: np.random.Generator) -> List[List[int]]:
    lengths = rng.integers(8, 33, batch)
    return [[int(t) for t in rng.integers(7, vocab, n) if t != eod] for n in lengths]


def _speed(generator, prompts, new_tokens: int) -> Dict[str, float]:
    from mindformers_sigma.generation.sampling import Sampling

    result = generator.generate(prompts, 0, new_tokens, Sampling(), stop_at_eod=False)
    return {"decode_tokens_per_s": result.decode_tokens_per_second,
            "prefill_tokens_per_s": result.prefill_tokens_per_second,
            "decode_steps": result.decode_steps, "compile_seconds": result.compile_seconds}


def run(quick: bool, out_dir: str) -> dict:
    import mindspore as ms

    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.context import configure_context
    from mindformers_sigma.generation.generator import Generator
    from mindformers_sigma.lifecycle.extract import extract_domain
    from mindformers_sigma.lifecycle.model_checkpoint import build_model, inference_config
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
    decoding = {}
    for batch, prompts in batches.items():
        print(f"bench generate: batch {batch}, {new_tokens} new tokens, KV cache then full recompute",
              file=sys.stderr, flush=True)
        cached = _speed(Generator(full, model.seq_length, eod, True), prompts, new_tokens)
        recomputed = _speed(Generator(full, model.seq_length, eod, False), prompts, new_tokens)
        decoding[str(batch)] = {"kv_cache": cached, "no_cache": recomputed,
                                "speedup": cached["decode_tokens_per_s"] / recomputed["decode_tokens_per_s"]}
    print("bench generate: extracted sub-model against the full model", file=sys.stderr, flush=True)
    sizes = {}
    for name, (cfg, network, arrays) in {"full": (config, full, weights), "sub_model": (sub_config, sub, sub_weights)}.items():
        sizes[name] = {"parameters": count_parameters(cfg).total,
                       "weight_bytes": int(sum(a.nbytes for a in arrays.values())),
                       **_speed(Generator(network, model.seq_length, eod, True), batches[8], new_tokens)}
    record = {"benchmark": "generate", "quick": quick, "config": str(TINY), "overrides": [f"model.seq_length={model.seq_length}"],
              "new_tokens": new_tokens, "decoding": decoding, "extracted": sizes}
    write_record(os.path.join(out_dir, "generate.json"), record, echo=False)
    print(table(record))
    return record


def table(record: dict) -> str:
    lines = [f"| batch | KV cache decode tokens/s | no-cache decode tokens/s | speedup ({record['new_tokens']} new tokens) |",
             "| --- | --- | --- | --- |"]
    for batch, row in record["decoding"].items():
        lines.append(f"| {batch} | {row['kv_cache']['decode_tokens_per_s']:,.0f} | "
                     f"{row['no_cache']['decode_tokens_per_s']:,.0f} | {row['speedup']:.1f}x |")
    lines += ["", "| model | parameters | weight MiB | prefill tokens/s (batch 8) | decode tokens/s (batch 8) |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in record["extracted"].items():
        lines.append(f"| {name.replace('_', ' ')} | {row['parameters']:,} | {row['weight_bytes'] / 2 ** 20:.2f} | "
                     f"{row['prefill_tokens_per_s']:,.0f} | {row['decode_tokens_per_s']:,.0f} |")
    return "\n".join(lines)
