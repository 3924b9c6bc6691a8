"""Word and learned position embeddings; the word table is tied to the output head."""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_sigma.model.dropout import SeededDropout


class LookupTable(nn.Cell):
    """A learned ``[rows, hidden]`` table looked up by integer ids."""

    def __init__(self, rows: int, hidden_size: int, init_std: float):
        super().__init__()
        self.embedding_table = Parameter(initializer(Normal(init_std), (rows, hidden_size), ms.float32),
                                         name="embedding_table")
        self.gather = ops.Gather()

    def construct(self, ids):
        return self.gather(self.embedding_table, ids, 0)


class Embedding(nn.Cell):
    """token ids + (EOD-reset) position ids -> hidden states."""

    def __init__(self, vocab_size: int, seq_length: int, hidden_size: int, init_std: float, dropout_rate: float,
                 dropout_site: int):
        super().__init__()
        self.word = LookupTable(vocab_size, hidden_size, init_std)
        self.position = LookupTable(seq_length, hidden_size, init_std)
        self.dropout = SeededDropout(dropout_rate, dropout_site)

    def construct(self, input_ids, position_ids, dropout_seed=None):
        return self.dropout(self.word(input_ids) + self.position(position_ids), dropout_seed)
