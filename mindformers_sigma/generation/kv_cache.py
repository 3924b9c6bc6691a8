"""Incremental decoding with a key/value cache, in two graphs of fixed shapes.

The cache holds ``seq_length`` columns per layer (``[B, heads, S, head_dim]`` for keys and for
values).  Prompts are left-padded so that every row's last prompt token sits in the same column:

* :class:`Prefill` runs the whole ``[B, S]`` window once (prompt columns, then padding that
  causal attention never lets the prompt see) and returns the next-token logits and the cache;
* :class:`DecodeStep` embeds one new token per row at column ``c``, writes its key and value
  into column ``c`` of every layer's cache and attends over the cache; the same compiled graph
  serves every step, as only tensor values change.

Positions count from each row's first real token; the attention bias hides the left padding
and the columns after ``c``.  Both cells call the model's one forward walk
(``PanGuSigmaForCausalLM.next_token_logits``), so the arithmetic is the training forward's.
"""

from __future__ import annotations

import numpy as np
from mindspore import nn

from mindformers_sigma.model.eod_reset import MASKED_SCORE
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM


class Prefill(nn.Cell):
    """(input_ids [B, S], position_ids [B, S], attention_bias [B, 1, S, S], domain_ids [B], last [B])
    -> (logits [B, V] at column ``last``, keys, values: one [B, heads, S, d] per layer)."""

    def __init__(self, model: PanGuSigmaForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, position_ids, attention_bias, domain_ids, last):
        return self.model.next_token_logits(input_ids, domain_ids, last, position_ids=position_ids,
                                            attention_bias=attention_bias)


class DecodeStep(nn.Cell):
    """(token_ids [B, 1], position_ids [B, 1], column_mask [1, 1, S, 1] bool, attention_bias [B, 1, 1, S],
    domain_ids [B], keys, values) -> (logits [B, V], keys, values) with column c written."""

    def __init__(self, model: PanGuSigmaForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, token_ids, position_ids, column_mask, attention_bias, domain_ids, keys, values):
        return self.model.next_token_logits(token_ids, domain_ids, position_ids=position_ids,
                                            attention_bias=attention_bias, kv_cache=(keys, values),
                                            cache_column=column_mask)


def left_padded_window(prompts: list, seq_length: int):
    """Prefill inputs for left-padded ``prompts``: (input_ids, position_ids, attention_bias, last, pads)."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    pads = np.array([longest - len(p) for p in prompts], np.int32)
    input_ids = np.zeros((batch, seq_length), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, pads[row]:longest] = prompt
    columns = np.arange(seq_length)
    position_ids = np.maximum(columns[None, :] - pads[:, None], 0).astype(np.int32)
    visible = (columns[None, None, :] >= pads[:, None, None]) & (columns[None, None, :] <= columns[None, :, None])
    bias = np.where(visible, 0.0, MASKED_SCORE).astype(np.float32)[:, None]
    return input_ids, position_ids, bias, np.full(batch, longest - 1, np.int32), pads


def decode_inputs(column: int, pads: np.ndarray, seq_length: int):
    """(position_ids [B, 1], column_mask [1, 1, S, 1], attention_bias [B, 1, 1, S]) for the token at ``column``."""
    columns = np.arange(seq_length)
    position_ids = (column - pads).astype(np.int32)[:, None]
    column_mask = (columns == column).reshape(1, 1, seq_length, 1)
    visible = (columns[None, :] >= pads[:, None]) & (columns[None, :] <= column)
    bias = np.where(visible, 0.0, MASKED_SCORE).astype(np.float32)[:, None, None, :]
    return position_ids, column_mask, bias
