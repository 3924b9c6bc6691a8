"""Token-level perplexity per domain and overall, with EOD inputs excluded as in training.

A position whose input is EOD predicts the first token of the next document, which has no
context; training does not count it, and neither does this.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from mindformers_sigma.eval.scoring import TokenLogProbs, score_rows


@dataclass
class DomainPerplexity:
    name: str
    samples: int
    tokens: int  # predicted tokens (inputs that are not EOD)
    nll_sum: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    def as_dict(self) -> dict:
        return {"samples": self.samples, "tokens": self.tokens, "mean_nll": self.nll_sum / max(self.tokens, 1),
                "perplexity": self.perplexity}


def domain_perplexity(scorer: TokenLogProbs, name: str, domain_id: int, samples: np.ndarray, seq_length: int,
                      eod_token_id: int, batch_size: int, progress: Optional[Callable[[int], None]] = None
                      ) -> DomainPerplexity:
    """Perplexity of ``samples`` [n, seq_length + 1] under domain ``domain_id``'s experts."""
    nll, tokens = 0.0, 0
    for first in range(0, samples.shape[0], batch_size):
        chunk = samples[first:first + batch_size]
        scored = score_rows(scorer, list(chunk), [domain_id] * chunk.shape[0], seq_length, batch_size)
        for row, (log_probs, _) in zip(chunk, scored):
            counted = row[:-1] != eod_token_id
            nll -= float(log_probs[counted].sum())
            tokens += int(counted.sum())
        if progress is not None:
            progress(chunk.shape[0])
    return DomainPerplexity(name, int(samples.shape[0]), tokens, nll)


def overall(results: List[DomainPerplexity]) -> DomainPerplexity:
    return DomainPerplexity("overall", sum(r.samples for r in results), sum(r.tokens for r in results),
                            sum(r.nll_sum for r in results))


class Progress:
    """A stderr line every ``every`` seconds on long runs: samples done of the total, rate, time left."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.done, self.every = total, 0, every
        self.started = self.last = time.perf_counter()

    def __call__(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            rate = self.done / (now - self.started)
            print(f"eval: {self.done:,}/{self.total:,} samples, {rate:,.1f} samples/s, "
                  f"{(self.total - self.done) / rate:,.0f}s left", file=sys.stderr, flush=True)
            self.last = now


def perplexity_report(results: Dict[str, DomainPerplexity]) -> str:
    lines = [f"{'domain':>14}  {'samples':>8}  {'tokens':>10}  {'mean NLL':>9}  {'perplexity':>11}"]
    for name, result in results.items():
        lines.append(f"{name:>14}  {result.samples:>8,}  {result.tokens:>10,}  {result.nll_sum / max(result.tokens, 1):>9.4f}  "
                     f"{result.perplexity:>11.2f}")
    return "\n".join(lines)
