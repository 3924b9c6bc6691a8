"""In-memory synthetic corpus: one Markov token stream per domain, with EOD-separated documents.

It has structure to learn (each domain follows its own random successor table most of the
time), so a short run shows a clearly falling loss without any files on disk.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

FOLLOW_PROBABILITY = 0.8
EOD_PROBABILITY = 0.02


def synthetic_batches(vocab_size: int, seq_length: int, batch_size: int, num_domains: int,
                      eod_token_id: int, seed: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Endless batches ``(tokens [B, seq_length + 1] int32, domain_ids [B] int32)``."""
    rng = np.random.default_rng(seed)
    successor = np.stack([rng.permutation(vocab_size) for _ in range(num_domains)])
    while True:
        domain_ids = rng.integers(0, num_domains, batch_size).astype(np.int32)
        tokens = np.empty((batch_size, seq_length + 1), dtype=np.int32)
        tokens[:, 0] = rng.integers(0, vocab_size, batch_size)
        for pos in range(1, seq_length + 1):
            follow = successor[domain_ids, tokens[:, pos - 1]]
            random = rng.integers(0, vocab_size, batch_size)
            tokens[:, pos] = np.where(rng.random(batch_size) < FOLLOW_PROBABILITY, follow, random)
            tokens[rng.random(batch_size) < EOD_PROBABILITY, pos] = eod_token_id
        yield tokens, domain_ids
