"""The decoding loop: prefill, then one token per step, until every row has emitted EOD or N tokens.

Both decoders (:mod:`kv_cache` and :mod:`full_recompute`) feed the same loop and the same
sampler with the same random stream, so ``--no-cache`` is an exact reference for the cache:
greedy decoding must give the same tokens, and a seed the same samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List

import numpy as np
import mindspore as ms

from mindformers_sigma.generation import full_recompute, kv_cache
from mindformers_sigma.generation.sampling import Sampling, next_tokens
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM


@dataclass
class Generation:
    """New tokens per prompt (up to and without EOD) and where the time went."""

    tokens: List[List[int]]
    prompt_tokens: int  # real prompt tokens, padding excluded
    decode_steps: int  # forward passes after the prefill
    batch: int
    compile_seconds: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens made per second by the decode steps, every row of the batch counted."""
        return self.decode_steps * self.batch / max(self.decode_seconds, 1e-9)


def _tensor(array: np.ndarray) -> ms.Tensor:
    return ms.Tensor(array)


class Generator:
    """Generates from one model; ``use_cache`` picks the KV-cached decoder or the full-recompute reference."""

    def __init__(self, model: PanGuSigmaForCausalLM, seq_length: int, eod_token_id: int, use_cache: bool = True):
        self.seq_length = seq_length
        self.eod_token_id = eod_token_id
        self.use_cache = use_cache
        if use_cache:
            self.prefill = kv_cache.Prefill(model)
            self.decode = kv_cache.DecodeStep(model)
        else:
            self.full = full_recompute.LastTokenLogits(model)
        self._compiled = set()

    def _run(self, cell, *inputs):
        """Call ``cell``; the first call of each cell and shape compiles first, timed apart."""
        key = (id(cell), tuple(tuple(x.shape) for x in inputs if isinstance(x, ms.Tensor)))
        compile_seconds = 0.0
        if key not in self._compiled:
            started = time.perf_counter()
            cell.compile(*inputs)
            compile_seconds = time.perf_counter() - started
            self._compiled.add(key)
        started = time.perf_counter()
        outputs = cell(*inputs)
        logits = outputs[0].asnumpy() if isinstance(outputs, tuple) else outputs.asnumpy()
        return outputs, logits, compile_seconds, time.perf_counter() - started

    def generate(self, prompts: List[List[int]], domain_id: int, max_new_tokens: int, sampling: Sampling,
                 seed: int = 0, stop_at_eod: bool = True) -> Generation:
        """Continue each prompt (token ids, each shorter than ``seq_length``) by at most ``max_new_tokens``,
        capped so that no sequence outgrows ``seq_length`` (in a batch: the longest prompt sets the room).
        ``stop_at_eod=False`` runs every step even when all rows have ended (benchmarks)."""
        longest = max(len(p) for p in prompts)
        steps = min(max_new_tokens, self.seq_length - longest)
        rng = np.random.default_rng(seed)
        domains = _tensor(np.full(len(prompts), domain_id, np.int32))
        made: List[List[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        compile_total, prefill_seconds, decode_seconds, decode_steps = 0.0, 0.0, 0.0, 0
        state = None
        for step in range(steps):
            if self.use_cache and step == 0:
                input_ids, positions, bias, last, pads = kv_cache.left_padded_window(prompts, self.seq_length)
                state, logits, compiled, seconds = self._run(self.prefill, _tensor(input_ids), _tensor(positions),
                                                             _tensor(bias), domains, _tensor(last))
            elif self.use_cache:
                column = longest - 1 + step
                positions, mask, bias = kv_cache.decode_inputs(column, pads, self.seq_length)
                previous = np.array([row[-1] for row in made], np.int32)[:, None]
                state, logits, compiled, seconds = self._run(self.decode, _tensor(previous), _tensor(positions),
                                                             _tensor(mask), _tensor(bias), domains,
                                                             ms.mutable(state[1]), ms.mutable(state[2]))
            else:
                input_ids, last = full_recompute.right_padded([p + m for p, m in zip(prompts, made)], self.seq_length)
                _, logits, compiled, seconds = self._run(self.full, _tensor(input_ids), domains, _tensor(last))
            compile_total += compiled
            if step == 0:
                prefill_seconds = seconds
            else:
                decode_seconds += seconds
                decode_steps += 1
            chosen = next_tokens(logits, sampling, rng)
            for row, token in enumerate(chosen.tolist()):
                made[row].append(int(token))
            done |= chosen == self.eod_token_id
            if stop_at_eod and done.all():
                break
        tokens = [row[:row.index(self.eod_token_id)] if self.eod_token_id in row else row for row in made]
        return Generation(tokens, sum(len(p) for p in prompts), decode_steps, len(prompts), compile_total,
                          prefill_seconds, decode_seconds)
