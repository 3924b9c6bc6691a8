"""The reference decoder (``--no-cache``): the training forward over the whole window for every token.

Rows are right-padded to ``seq_length``; causal attention keeps the padding out of every real
position, so each row's next-token logits are those of its own unpadded sequence.
"""

from __future__ import annotations

import numpy as np
from mindspore import nn

from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM


class LastTokenLogits(nn.Cell):
    """(input_ids [B, S], domain_ids [B], last [B]) -> logits [B, V] of the token after column ``last``."""

    def __init__(self, model: PanGuSigmaForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, domain_ids, last):
        logits, _, _ = self.model.next_token_logits(input_ids, domain_ids, last)
        return logits


def right_padded(sequences: list, seq_length: int):
    """(input_ids [B, S], last [B]) for ``sequences``, each at most ``seq_length`` tokens."""
    input_ids = np.zeros((len(sequences), seq_length), np.int32)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = sequence
    return input_ids, np.array([len(s) - 1 for s in sequences], np.int32)
