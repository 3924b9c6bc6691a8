"""In-memory synthetic corpus: one Markov token stream per domain, with EOD-separated documents.

It has structure to learn (each domain follows its own random successor table most of the
time), so a short run shows a falling loss without any files on disk.  Sample ``p`` is a
pure function of ``(seed, p)``, so reading can restart at any position like real data.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

FOLLOW_PROBABILITY = 0.8
EOD_PROBABILITY = 0.02


class SyntheticSource:
    """``read(start, count)`` -> (tokens [count, seq_length + 1] int32, domain_ids [count] int32)."""

    def __init__(self, vocab_size: int, seq_length: int, num_domains: int, eod_token_id: int, seed: int):
        self.vocab_size = vocab_size
        self.sample_length = seq_length + 1
        self.num_domains = num_domains
        self.eod_token_id = eod_token_id
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        self.successor = np.stack([rng.permutation(vocab_size) for _ in range(num_domains)])

    def _sample(self, position: int) -> Tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, 1, position])
        domain = int(rng.integers(self.num_domains))
        follow = rng.random(self.sample_length) < FOLLOW_PROBABILITY
        eod = rng.random(self.sample_length) < EOD_PROBABILITY
        random_tokens = rng.integers(0, self.vocab_size, self.sample_length)
        tokens = np.empty(self.sample_length, dtype=np.int32)
        tokens[0] = random_tokens[0]
        for pos in range(1, self.sample_length):
            tokens[pos] = self.successor[domain, tokens[pos - 1]] if follow[pos] else random_tokens[pos]
            if eod[pos]:
                tokens[pos] = self.eod_token_id
        return tokens, domain

    def read(self, start: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
        samples = [self._sample(p) for p in range(start, start + count)]
        return np.stack([s[0] for s in samples]), np.array([s[1] for s in samples], dtype=np.int32)
