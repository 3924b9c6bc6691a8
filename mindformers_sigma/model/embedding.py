"""Word and learned position embeddings; the word table is tied to the output head."""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_sigma.distributed.collectives import Sharding
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


class VocabularyParallelTable(LookupTable):
    """The word table split on the vocabulary over the model-parallel ranks: each holds
    ``vocab / mp`` rows from ``first_row``, looks up the ids it holds (zeros for the others), and the
    partial rows are summed over mp."""

    def __init__(self, vocab_size: int, hidden_size: int, init_std: float, sharding: Sharding):
        rows = vocab_size // sharding.model_parallel
        super().__init__(rows, hidden_size, init_std)
        self.rows = rows
        self.first_row = sharding.model_index * rows
        self.reduce = sharding.reduce_from_model()

    def construct(self, ids):
        local = ids - self.first_row
        held = ops.logical_and(local >= 0, local < self.rows)
        rows = self.gather(self.embedding_table, ops.where(held, local, ops.zeros_like(local)), 0)
        return self.reduce(rows * held.astype(rows.dtype).expand_dims(-1))


class Embedding(nn.Cell):
    """token ids + (EOD-reset) position ids -> hidden states."""

    def __init__(self, vocab_size: int, seq_length: int, hidden_size: int, init_std: float, dropout_rate: float,
                 dropout_site: int, sharding: Sharding = Sharding()):
        super().__init__()
        self.word = (VocabularyParallelTable(vocab_size, hidden_size, init_std, sharding) if sharding.splits_vocabulary
                     else LookupTable(vocab_size, hidden_size, init_std))
        self.position = LookupTable(seq_length, hidden_size, init_std)
        self.dropout = SeededDropout(dropout_rate, dropout_site)

    def construct(self, input_ids, position_ids, dropout_seed=None):
        return self.dropout(self.word(input_ids) + self.position(position_ids), dropout_seed)
