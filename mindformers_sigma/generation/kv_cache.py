"""Incremental decoding with a key/value cache, in two graphs of fixed shapes.

The cache holds ``seq_length`` columns per layer (``[B, heads, S, head_dim]`` for keys and for
values).  Prompts are left-padded so that every row's last prompt token sits in the same column:

* :class:`Prefill` runs the whole ``[B, S]`` window once (prompt columns, then padding that
  causal attention never lets the prompt see) and returns the next-token logits and the cache;
* :class:`DecodeStep` embeds one new token per row at column ``c``, writes its key and value
  into column ``c`` of every layer's cache and attends over the cache; the same compiled graph
  serves every step, as only tensor values change.

Positions count from each row's first real token; the attention bias hides the left padding
and the columns after ``c``.  Both cells reuse the model's own layers (``DecoderLayer.
attention_inputs`` / ``finish``), so the arithmetic is the training forward's.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.model.eod_reset import MASKED_SCORE
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM


def gather_rows(hidden, columns):
    """hidden [B, S, H], columns [B] int32 -> [B, H]: row b's hidden state at column ``columns[b]``."""
    batch, seq, width = hidden.shape
    index = ops.arange(batch, dtype=ms.int32) * seq + columns
    return ops.gather(hidden.reshape((batch * seq, width)), index, 0)


class Prefill(nn.Cell):
    """(input_ids [B, S], position_ids [B, S], attention_bias [B, 1, S, S], domain_ids [B], last [B])
    -> (logits [B, V] at column ``last``, keys, values: one [B, heads, S, d] per layer)."""

    def __init__(self, model: PanGuSigmaForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, position_ids, attention_bias, domain_ids, last):
        backbone = self.model.backbone
        hidden = backbone.embedding(input_ids, position_ids)
        keys, values = (), ()
        for layer in backbone.layers:
            query, key, value = layer.attention_inputs(hidden)
            hidden, _, _ = layer.finish(hidden, query, key, value, attention_bias, input_ids, domain_ids)
            keys += (key,)
            values += (value,)
        hidden = backbone.final_norm(hidden)
        top = backbone.top_query_layer
        query, key, value = top.attention_inputs(hidden, backbone.top_query_embedding(position_ids))
        hidden, _, _ = top.finish(hidden, query, key, value, attention_bias, input_ids, domain_ids)
        return self.model.vocabulary_logits(gather_rows(hidden, last)), keys + (key,), values + (value,)


def _written(cache, new, column_mask):
    """``cache`` with column ``c`` replaced by ``new`` [B, heads, 1, d] (``column_mask``: bool, true at c only)."""
    return ops.where(column_mask, new.astype(cache.dtype), cache)


class DecodeStep(nn.Cell):
    """(token_ids [B, 1], position_ids [B, 1], column_mask [1, 1, S, 1] bool, attention_bias [B, 1, 1, S],
    domain_ids [B], keys, values) -> (logits [B, V], keys, values) with column c written."""

    def __init__(self, model: PanGuSigmaForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model
        # hidden x word_table^T without transposing the table every step (2.8x faster at [1, 128] x [4096, 128])
        self.head = ops.MatMul(transpose_b=True)

    def construct(self, token_ids, position_ids, column_mask, attention_bias, domain_ids, keys, values):
        backbone = self.model.backbone
        hidden = backbone.embedding(token_ids, position_ids)
        new_keys, new_values = (), ()
        index = 0
        for layer in backbone.layers:
            query, key, value = layer.attention_inputs(hidden)
            key = _written(keys[index], key, column_mask)
            value = _written(values[index], value, column_mask)
            hidden, _, _ = layer.finish(hidden, query, key, value, attention_bias, token_ids, domain_ids,
                                        None, None, True)
            new_keys += (key,)
            new_values += (value,)
            index += 1
        hidden = backbone.final_norm(hidden)
        top = backbone.top_query_layer
        query, key, value = top.attention_inputs(hidden, backbone.top_query_embedding(position_ids))
        key = _written(keys[index], key, column_mask)
        value = _written(values[index], value, column_mask)
        hidden, _, _ = top.finish(hidden, query, key, value, attention_bias, token_ids, domain_ids, None, None, True)
        word_table = backbone.embedding.word.embedding_table
        logits = self.head(hidden.reshape((hidden.shape[0], hidden.shape[2])).astype(ms.float32), word_table)
        return logits, new_keys + (key,), new_values + (value,)


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
