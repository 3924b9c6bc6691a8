"""EOD reset for packed samples: positions restart after each EOD, attention stays inside a document.

A token belongs to the document that its nearest following EOD closes (the EOD itself
included), so the document id is the number of EODs strictly before the token.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

MASKED_SCORE = -1.0e9


class EodResetMask(nn.Cell):
    """input_ids [B, S] -> (position_ids [B, S] int32, attention_bias [B, 1, S, S] float32)."""

    def __init__(self, max_seq_length: int, eod_token_id: int):
        super().__init__()
        self.eod_token_id = eod_token_id
        self.causal = Tensor(np.tril(np.ones((max_seq_length, max_seq_length), dtype=np.bool_)))

    def construct(self, input_ids):
        seq = input_ids.shape[1]
        is_eod = (input_ids == self.eod_token_id).astype(ms.int32)
        document = ops.cumsum(is_eod, 1) - is_eod
        same_document = document.expand_dims(2) == document.expand_dims(1)
        allowed = ops.logical_and(same_document, self.causal[:seq, :seq].expand_dims(0))
        position_ids = allowed.astype(ms.int32).sum(-1) - 1
        bias = (1.0 - allowed.astype(ms.float32)) * MASKED_SCORE
        return position_ids, bias.expand_dims(1)
