"""Per-token log-probabilities of given next tokens, in one graph: what perplexity and zero-shot scoring need.

Rows are right-padded to ``seq_length``; causal attention keeps padding out of every real position,
so each row's numbers are those of its own tokens.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM


class TokenLogProbs(nn.Cell):
    """(input_ids [B, S], targets [B, S], domain_ids [B]) -> (log p(target) [B, S], target is the argmax [B, S])."""

    def __init__(self, model: PanGuSigmaForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, targets, domain_ids):
        logits, _, _ = self.model.logits(input_ids, domain_ids)
        batch, seq, vocab = logits.shape
        log_probs = ops.log_softmax(logits.reshape((-1, vocab)), -1)
        picked = ops.gather_elements(log_probs, 1, targets.reshape((-1, 1))).reshape((batch, seq))
        greedy = (ops.argmax(logits, -1).astype(ms.int32) == targets)
        return picked, greedy


def score_rows(scorer: TokenLogProbs, rows: Sequence[Sequence[int]], domain_ids: Sequence[int], seq_length: int,
               batch_size: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """For each token row (at most ``seq_length + 1`` tokens): (log p of tokens 1.., greedy flags), float64/bool.

    Batches have a fixed shape (the last is filled with copies of its first row), so one graph serves all.
    """
    results: List[Tuple[np.ndarray, np.ndarray]] = []
    for first in range(0, len(rows), batch_size):
        chunk = list(rows[first:first + batch_size])
        domains = list(domain_ids[first:first + batch_size])
        count = len(chunk)
        chunk += [chunk[0]] * (batch_size - count)
        domains += [domains[0]] * (batch_size - count)
        inputs = np.zeros((batch_size, seq_length), np.int32)
        targets = np.zeros((batch_size, seq_length), np.int32)
        for row, tokens in enumerate(chunk):
            inputs[row, :len(tokens) - 1] = tokens[:-1]
            targets[row, :len(tokens) - 1] = tokens[1:]
        picked, greedy = scorer(ms.Tensor(inputs), ms.Tensor(targets), ms.Tensor(np.asarray(domains, np.int32)))
        picked, greedy = picked.asnumpy().astype(np.float64), greedy.asnumpy()
        for row in range(count):
            length = len(chunk[row]) - 1
            results.append((picked[row, :length], greedy[row, :length]))
    return results
