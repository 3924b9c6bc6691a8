"""PanGu-Σ: a PanGu-α decoder whose top layers are Random Routed Expert layers.

Layout (``num_layers`` in all): ``dense_layers`` shared dense layers at the bottom, then
``sparse_layers`` MoE layers; the very last layer is PanGu-α's top query layer.  A final
LayerNorm sits before the query layer, and the output head is the transposed word
embedding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.model.block import DecoderLayer
from mindformers_sigma.model.embedding import Embedding, LookupTable
from mindformers_sigma.model.eod_reset import EodResetMask
from mindformers_sigma.model.layers import LayerNorm
from mindformers_sigma.moe.routing_table import build_routing_table


def build_routing_tables(config: SigmaConfig, token_frequency: Optional[np.ndarray] = None) -> list:
    """One RRE table per sparse layer, drawn from ``moe.routing_seed`` (empty for learned routers)."""
    if config.moe.router != "rre":
        return []
    moe = config.moe
    return [
        build_routing_table(config.model.vocab_size, moe.num_domains, moe.experts_per_domain,
                            moe.routing_seed, layer, token_frequency)
        for layer in range(config.model.sparse_layers)
    ]


class PanGuSigmaModel(nn.Cell):
    """input_ids [B, S], domain_ids [B] -> (hidden [B, S, H], aux_loss, dropped assignments)."""

    def __init__(self, config: SigmaConfig, routing_tables: Optional[Sequence[np.ndarray]] = None,
                 expert_slots: Optional[int] = None):
        super().__init__()
        model = config.model
        if routing_tables is None:
            routing_tables = build_routing_tables(config)
        layers = []
        for index in range(model.num_layers):
            sparse_index = index - model.dense_layers
            sparse = sparse_index >= 0
            table = routing_tables[sparse_index] if sparse and config.moe.router == "rre" else None
            layers.append(DecoderLayer(config, index, sparse, table, expert_slots))
        self.embedding = Embedding(model.vocab_size, model.seq_length, model.hidden_size, model.init_std,
                                   model.dropout_rate, dropout_site=0)
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

    def construct(self, input_ids, domain_ids, expert_plan=None, dropout_seed=None):
        """``expert_plan`` [sparse_layers, K, C + 1]: the host's RRE dispatch (``moe/expert_plan.py``)."""
        position_ids, attention_bias = self.eod_reset(input_ids)
        hidden = self.embedding(input_ids, position_ids, dropout_seed)
        aux_loss = ops.zeros((), ms.float32)
        dropped = ops.zeros((), ms.int32)
        for index, layer in enumerate(self.layers):
            hidden, layer_aux, layer_dropped = layer(hidden, attention_bias, input_ids, domain_ids, None,
                                                     self._layer_plan(expert_plan, index), dropout_seed)
            aux_loss += layer_aux
            dropped += layer_dropped
        hidden = self.final_norm(hidden)
        query_hidden = self.top_query_embedding(position_ids)
        top_plan = self._layer_plan(expert_plan, len(self.layers))
        hidden, layer_aux, layer_dropped = self.top_query_layer(
            hidden, attention_bias, input_ids, domain_ids, query_hidden, top_plan, dropout_seed
        )
        return hidden, aux_loss + layer_aux, dropped + layer_dropped


class PanGuSigmaForCausalLM(nn.Cell):
    """Next-token statistics over packed samples ``tokens [B, S+1]`` with ``domain_ids [B]``.

    Returns ``(nll_per_domain [D], tokens_per_domain [D], aux_loss, dropped)``: summed
    negative log-likelihood and the number of predicted tokens per domain, so that the
    training layer can normalise over a whole (data-parallel) batch and log per-domain loss.
    As in PanGu-α, positions whose *input* is EOD are not predicted: the first token of the
    next document has no context.
    """

    def __init__(self, config: SigmaConfig, routing_tables: Optional[Sequence[np.ndarray]] = None,
                 expert_slots: Optional[int] = None):
        """``expert_slots``: sparse layers hold only that many experts (the ECSS slab, ``ecss/``)."""
        super().__init__()
        self.backbone = PanGuSigmaModel(config, routing_tables, expert_slots)
        self.eod_token_id = config.model.eod_token_id
        self.num_domains = config.moe.num_domains
        self.head = ops.MatMul()  # hidden x word_table^T: the tied output head

    def logits(self, input_ids, domain_ids, expert_plan=None, dropout_seed=None):
        """input_ids [B, S], domain_ids [B] -> (float32 logits [B, S, V], aux_loss, dropped)."""
        hidden, aux_loss, dropped = self.backbone(input_ids, domain_ids, expert_plan, dropout_seed)
        batch, seq, width = hidden.shape
        return self.vocabulary_logits(hidden.reshape((batch * seq, width))).reshape((batch, seq, -1)), aux_loss, dropped

    def vocabulary_logits(self, hidden):
        """hidden [N, H] -> float32 logits [N, V] through the tied head."""
        word_table = self.backbone.embedding.word.embedding_table
        return self.head(hidden.astype(ms.float32), word_table.transpose(1, 0))

    def construct(self, tokens, domain_ids, expert_plan=None, dropout_seed=None):
        input_ids = tokens[:, :-1]
        labels = tokens[:, 1:]
        logits, aux_loss, dropped = self.logits(input_ids, domain_ids, expert_plan, dropout_seed)
        batch, seq, vocab = logits.shape
        log_probs = ops.log_softmax(logits.reshape((-1, vocab)), -1)
        token_nll = -ops.gather_elements(log_probs, 1, labels.reshape((-1, 1))).reshape((batch, seq))
        loss_mask = (input_ids != self.eod_token_id).astype(ms.float32)
        nll_per_domain = ops.unsorted_segment_sum((token_nll * loss_mask).sum(1), domain_ids, self.num_domains)
        tokens_per_domain = ops.unsorted_segment_sum(loss_mask.sum(1), domain_ids, self.num_domains)
        return nll_per_domain, tokens_per_domain, aux_loss, dropped
