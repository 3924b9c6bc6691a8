"""SentencePiece tokenizer: trained so that any text, code whitespace included, round-trips exactly.

Special ids follow PanGu-α where it matters: the end-of-document token ``<eod>`` has id 6.
Unknown characters fall back to UTF-8 bytes, normalisation is the identity, and spaces,
tabs and newlines are kept as they are.
"""

from __future__ import annotations

import io
from typing import Iterable, List

import sentencepiece as spm

from mindformers_sigma.errors import UserError

KIND = "sentencepiece_bpe"
EOD_PIECE = "<eod>"
EOD_ID = 6
# ids 0-3 are SentencePiece's own; 4-5 are reserved so that <eod> lands on PanGu-α's id 6.
_USER_SYMBOLS = ["<mask>", "<sep>", EOD_PIECE]


class TokenizerError(UserError):
    """A tokenizer file is missing, unreadable or not a usable SentencePiece model."""


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> bytes:
    """Train a byte-fallback BPE model on ``documents`` and return the serialized model.

    Training is single-threaded and unshuffled, so the same documents give the same bytes.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=_USER_SYMBOLS,
        max_sentence_length=1 << 20,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_processor(model_bytes: bytes, source: str, advice: str) -> spm.SentencePieceProcessor:
    """The SentencePiece model in ``model_bytes``; garbage is one line naming ``source`` and ``advice``."""
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except Exception:  # sentencepiece raises RuntimeError/OSError variants for garbage input
        raise TokenizerError(f"{source}: not a SentencePiece model; {advice}") from None
    return processor


class Tokenizer:
    """Encode/decode with a SentencePiece model whose ``<eod>`` id is 6."""

    kind = KIND
    eod_id = EOD_ID

    def __init__(self, model_bytes: bytes, source: str = "<tokenizer>"):
        self.source = source
        processor = sentencepiece_processor(model_bytes, source, "pass a .model file written by prepare-data or "
                                                                 "spm_train")
        if processor.piece_to_id(EOD_PIECE) != EOD_ID:
            raise TokenizerError(f"{source}: {EOD_PIECE} has id {processor.piece_to_id(EOD_PIECE)}, "
                                 f"expected {EOD_ID}; train it with prepare-data --vocab-size")
        if not processor.IsByte(processor.piece_to_id("<0x0A>")):
            raise TokenizerError(f"{source}: model has no byte fallback, so text would not round-trip; "
                                 f"train it with prepare-data --vocab-size")
        self._processor = processor
        self.model_bytes = model_bytes  # what a checkpoint's description embeds

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as err:
            raise TokenizerError(f"{path}: cannot read tokenizer ({err.strerror})") from None
        return cls(data, path)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self._processor.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])
