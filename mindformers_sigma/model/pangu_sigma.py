"""PanGu-Σ: a PanGu-α decoder whose top layers are Random Routed Expert layers.

Layout (``num_layers`` in all): ``dense_layers`` shared dense layers at the bottom, then
``sparse_layers`` MoE layers; the very last layer is PanGu-α's top query layer.  A final
LayerNorm sits before the query layer, and the output head is the transposed word
embedding.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.distributed.collectives import Sharding
from mindformers_sigma.model import names
from mindformers_sigma.model.block import DecoderLayer
from mindformers_sigma.model.embedding import Embedding, LookupTable
from mindformers_sigma.model.eod_reset import EodResetMask
from mindformers_sigma.model.layers import LayerNorm
from mindformers_sigma.moe.moe_layer import MoELayer
from mindformers_sigma.moe.routing_table import build_routing_table


def build_routing_tables(config: SigmaConfig, token_frequency: Optional[np.ndarray] = None) -> list:
    """One RRE table per sparse layer, drawn from ``moe.routing_seed`` (empty for learned routers)."""
    if not config.moe.table_routed:
        return []
    moe = config.moe
    return [
        build_routing_table(config.model.vocab_size, moe.num_domains, moe.experts_per_domain,
                            moe.routing_seed, layer, token_frequency)
        for layer in range(config.model.sparse_layers)
    ]


def routing_tables_of(network: nn.Cell) -> Dict[str, np.ndarray]:
    """Every RRE table of a built model (inside any cell, e.g. a train step), by its parameter name,
    bottom layer first; an ECSS layer's is the host's own array, under the name a plain model's
    Parameter has.  Empty for learned routers."""
    found = {}
    for _, cell in network.cells_and_names():
        table = cell.routing_table() if isinstance(cell, MoELayer) else None
        if table is not None:
            found[names.routing_table_name(names.layer_of(cell.experts.w1.name))] = table
    return found


class PanGuSigmaModel(nn.Cell):
    """The decoder stack: embeddings, the layers, the final norm and the top query layer.

    One walk serves training, scoring, prefill and each decoding step (``construct``)."""

    def __init__(self, config: SigmaConfig, routing_tables: Optional[Sequence[np.ndarray]] = None,
                 expert_slots: Optional[int] = None, sharding: Sharding = Sharding()):
        super().__init__()
        model = config.model
        if routing_tables is None:
            routing_tables = build_routing_tables(config)
        layers = []
        for index in range(model.num_layers):
            sparse_index = index - model.dense_layers
            sparse = sparse_index >= 0
            table = routing_tables[sparse_index] if sparse and config.moe.table_routed else None
            layers.append(DecoderLayer(config, index, sparse, table, expert_slots, sharding))
        self.embedding = Embedding(model.vocab_size, model.seq_length, model.hidden_size, model.init_std,
                                   model.dropout_rate, dropout_site=0, sharding=sharding)
        self.eod_reset = EodResetMask(model.seq_length, model.eod_token_id)
        self.layers = nn.CellList(layers[:-1])
        self.final_norm = LayerNorm(model.hidden_size, model.layernorm_epsilon)
        self.top_query_embedding = LookupTable(model.seq_length, model.hidden_size, model.init_std)
        self.top_query_layer = layers[-1]
        self.dense_layers = model.dense_layers

    def _layer_plan(self, expert_plan, index: int):
        """Layer ``index``'s slice of the stacked RRE plan (None for dense layers or without a plan)."""
        if expert_plan is None or index < self.dense_layers:
            return None
        return expert_plan[index - self.dense_layers]

    def construct(self, input_ids, domain_ids, position_ids=None, attention_bias=None, expert_plan=None,
                  dropout_seed=None, kv_cache=None, cache_column=None, per_token_experts=False):
        """input_ids [B, S], domain_ids [B] -> (hidden [B, S, H], aux_loss, dropped, (keys, values)).

        ``position_ids`` [B, S] and ``attention_bias`` [B, 1, S, Sk]: None computes both by the EOD reset
        of ``input_ids`` (packed training samples); decoding passes its own.  ``expert_plan``
        [sparse_layers, K, C + 1]: the host's RRE dispatch (``moe/expert_plan.py``).  ``kv_cache``
        (keys, values), one [B, heads, S, d] per layer, with ``cache_column`` [1, 1, S, 1] bool: one decoding
        step, whose keys and values are written at that column (``DecoderLayer``).  The returned keys and
        values are each layer's attention inputs: the cache a prefill starts, or the updated one.
        """
        if position_ids is None:
            position_ids, attention_bias = self.eod_reset(input_ids)
        hidden = self.embedding(input_ids, position_ids, dropout_seed)
        aux_loss = ops.zeros((), ms.float32)
        dropped = ops.zeros((), ms.int32)
        keys, values = (), ()
        index = 0
        for layer in self.layers:
            past_key, past_value = _past(kv_cache, index)
            hidden, layer_aux, layer_dropped, key, value = layer(
                hidden, attention_bias, input_ids, domain_ids, expert_plan=self._layer_plan(expert_plan, index),
                dropout_seed=dropout_seed, past_key=past_key, past_value=past_value, cache_column=cache_column,
                per_token_experts=per_token_experts)
            aux_loss += layer_aux
            dropped += layer_dropped
            keys += (key,)
            values += (value,)
            index += 1
        past_key, past_value = _past(kv_cache, index)
        hidden, layer_aux, layer_dropped, key, value = self.top_query_layer(
            self.final_norm(hidden), attention_bias, input_ids, domain_ids,
            query_hidden=self.top_query_embedding(position_ids), expert_plan=self._layer_plan(expert_plan, index),
            dropout_seed=dropout_seed, past_key=past_key, past_value=past_value, cache_column=cache_column,
            per_token_experts=per_token_experts)
        return hidden, aux_loss + layer_aux, dropped + layer_dropped, (keys + (key,), values + (value,))


def _past(kv_cache, index: int):
    """Layer ``index``'s cached (key, value), or (None, None) without a cache."""
    if kv_cache is None:
        return None, None
    return kv_cache[0][index], kv_cache[1][index]


def gather_rows(hidden, columns):
    """hidden [B, S, H], columns [B] int32 -> [B, H]: row b's hidden state at column ``columns[b]``."""
    batch, seq, width = hidden.shape
    index = ops.arange(batch, dtype=ms.int32) * seq + columns
    return ops.gather(hidden.reshape((batch * seq, width)), index, 0)


class VocabularyParallelLoss(nn.Cell):
    """Cross-entropy over logits split on the vocabulary: each rank holds ``V / mp`` columns.

    The row maximum is gathered (a constant shift, so no gradient), the sums of exponentials and the
    target logits are summed over mp; nothing of size V crosses ranks."""

    def __init__(self, sharding: Sharding):
        super().__init__()
        self.copy_in = sharding.copy_to_model()
        self.reduce = sharding.reduce_from_model()
        self.gather = sharding.gather_model()
        self.model_index = sharding.model_index

    def construct(self, logits, labels):
        """logits [N, V / mp] (this rank's columns), labels [N] -> the NLL of each label [N]."""
        columns = logits.shape[1]
        shift = self.gather(logits.max(axis=1)).max(axis=0)
        shifted = logits - shift.expand_dims(1)
        sum_exp = self.reduce(ops.exp(shifted).sum(1))
        local = labels - self.model_index * columns
        held = ops.logical_and(local >= 0, local < columns)
        picked = ops.gather_elements(shifted, 1, ops.where(held, local, ops.zeros_like(local)).reshape((-1, 1)))
        target = self.reduce(picked.reshape((-1,)) * held.astype(picked.dtype))
        return ops.log(sum_exp) - target


class PanGuSigmaForCausalLM(nn.Cell):
    """Next-token statistics over packed samples ``tokens [B, S+1]`` with ``domain_ids [B]``.

    Returns ``(nll_per_domain [D], tokens_per_domain [D], aux_loss, dropped)``: summed
    negative log-likelihood and the number of predicted tokens per domain, so that the
    training layer can normalise over a whole (data-parallel) batch and log per-domain loss.
    As in PanGu-α, positions whose *input* is EOD are not predicted: the first token of the
    next document has no context.  With a vocabulary split over model parallel the head gives each
    rank its rows' logits and the cross-entropy combines the ranks' sums (``VocabularyParallelLoss``).
    """

    def __init__(self, config: SigmaConfig, routing_tables: Optional[Sequence[np.ndarray]] = None,
                 expert_slots: Optional[int] = None, sharding: Sharding = Sharding()):
        """``expert_slots``: sparse layers hold only that many experts (the ECSS slab, ``ecss/``);
        ``sharding``: this rank's part of a model split over several processes (``distributed/``)."""
        super().__init__()
        self.backbone = PanGuSigmaModel(config, routing_tables, expert_slots, sharding)
        self.vocabulary_parallel = VocabularyParallelLoss(sharding) if sharding.splits_vocabulary else None
        self.eod_token_id = config.model.eod_token_id
        self.num_domains = config.moe.num_domains
        # the tied output head, hidden x word_table^T; transpose_b reads the table as stored (a transposed copy
        # each call costs 5-10x the product at a decoding step's shapes, and the same in training)
        self.head = ops.MatMul(transpose_b=True)

    def vocabulary_logits(self, hidden):
        """hidden [N, H] -> float32 logits [N, V] through the tied head (this rank's [N, V / mp] when the
        vocabulary is split)."""
        if self.vocabulary_parallel is not None:
            hidden = self.vocabulary_parallel.copy_in(hidden)
        return self.head(hidden.astype(ms.float32), self.backbone.embedding.word.embedding_table)

    def logits(self, input_ids, domain_ids, expert_plan=None, dropout_seed=None):
        """input_ids [B, S], domain_ids [B] -> (float32 logits [B, S, V], aux_loss, dropped)."""
        hidden, aux_loss, dropped, _ = self.backbone(input_ids, domain_ids, expert_plan=expert_plan,
                                                     dropout_seed=dropout_seed)
        batch, seq, width = hidden.shape
        return self.vocabulary_logits(hidden.reshape((batch * seq, width))).reshape((batch, seq, -1)), aux_loss, dropped

    def next_token_logits(self, input_ids, domain_ids, last=None, position_ids=None, attention_bias=None,
                          kv_cache=None, cache_column=None):
        """(logits [B, V] of the token after column ``last`` [B] of each row, or after the last column when
        ``last`` is None, keys, values): generation's forward, from a whole window or, with ``kv_cache``, one
        step (``PanGuSigmaModel``); a decoding step computes each token with its experts' weights gathered,
        as it has fewer tokens than experts."""
        hidden, _, _, (keys, values) = self.backbone(input_ids, domain_ids, position_ids=position_ids,
                                                     attention_bias=attention_bias, kv_cache=kv_cache,
                                                     cache_column=cache_column,
                                                     per_token_experts=kv_cache is not None)
        hidden = hidden[:, -1] if last is None else gather_rows(hidden, last)
        return self.vocabulary_logits(hidden), keys, values

    def construct(self, tokens, domain_ids, expert_plan=None, dropout_seed=None):
        input_ids = tokens[:, :-1]
        labels = tokens[:, 1:]
        logits, aux_loss, dropped = self.logits(input_ids, domain_ids, expert_plan, dropout_seed)
        batch, seq, vocab = logits.shape
        if self.vocabulary_parallel is not None:
            token_nll = self.vocabulary_parallel(logits.reshape((-1, vocab)), labels.reshape((-1,))).reshape((batch, seq))
        else:
            log_probs = ops.log_softmax(logits.reshape((-1, vocab)), -1)
            token_nll = -ops.gather_elements(log_probs, 1, labels.reshape((-1, 1))).reshape((batch, seq))
        loss_mask = (input_ids != self.eod_token_id).astype(ms.float32)
        nll_per_domain = ops.unsorted_segment_sum((token_nll * loss_mask).sum(1), domain_ids, self.num_domains)
        tokens_per_domain = ops.unsorted_segment_sum(loss_mask.sum(1), domain_ids, self.num_domains)
        return nll_per_domain, tokens_per_domain, aux_loss, dropped
