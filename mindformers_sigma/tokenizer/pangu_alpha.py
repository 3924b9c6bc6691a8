"""PanGu-α's tokenizer: jieba word segmentation, then SentencePiece over the segments.

What the official ``JIEBATokenizer`` of the PanGu-α releases computes (``pcl-pangu``,
``panguAlpha_mindspore/src/tokenization_jieba.py``): the text is cut by jieba 0.42 (precise mode),
spaces and newlines inside each segment become U+2582 and U+2583, the segments are joined by
spaces, and SentencePiece encodes the result.  Decoding reverses it: SentencePiece decodes, every
space (a segment joint) is dropped, U+2582 becomes a space and U+2583 a newline.  Characters outside
the 40,000-piece vocabulary (most emoji) become ``<unk>``, tabs become joints that decoding drops, and
control characters vanish, as they do in the original.

End of document: this project uses ``<eot>`` (id 9).  It is the token the released weights end a
document with: the official preprocessing appends the tokenizer's ``eot_id`` after each document, the
official generation scripts stop at 9 (``end_token = 9``), and ``pcl-pangu``'s own tokenizer names 9 its
``eod``.  The training code also masks ``<pad>`` (6) out of the loss (``PanguAlphaWithLoss(eos_token=6)``),
but 6 is padding there, which this project's packed samples never hold; ``<eod>`` (8) is unused by
the official code.
"""

from __future__ import annotations

import logging
from typing import Iterable, List

import sentencepiece as spm

from mindformers_sigma.errors import UserError
from mindformers_sigma.tokenizer.sentencepiece_bpe import sentencepiece_processor

KIND = "pangu_alpha"
EOD_ID = 9  # <eot>: see the module docstring
SPACE, NEWLINE = "\u2582", "\u2583"
_SPECIAL_PIECES = {"<pad>": 6, "<eod>": 8, "<eot>": 9, SPACE: 4, NEWLINE: 3}
INSTALL = "pip install -e '.[pangu-alpha]'"


class PanGuAlphaTokenizerError(UserError):
    """The vocabulary is not a PanGu-α SentencePiece model, or jieba is not installed."""


def is_pangu_alpha_vocabulary(processor: spm.SentencePieceProcessor) -> bool:
    """The PanGu-α vocabulary's special pieces sit at their ids (``<pad>`` 6, ``<eot>`` 9, U+2582 4...)."""
    size = processor.get_piece_size()
    return all(index < size and processor.id_to_piece(index) == piece for piece, index in _SPECIAL_PIECES.items())


def _jieba():
    try:
        import jieba
    except ImportError:
        raise PanGuAlphaTokenizerError(f"the PanGu-α tokenizer needs jieba; install it with {INSTALL}") from None
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading lines would mix into the command's output
    return jieba


class PanGuAlphaTokenizer:
    """Encode/decode as PanGu-α does; ``model_bytes`` is its SentencePiece vocabulary (``vocab.model``)."""

    kind = KIND
    eod_id = EOD_ID

    def __init__(self, model_bytes: bytes, source: str = "<tokenizer>"):
        self.source = source
        processor = sentencepiece_processor(model_bytes, source, "give PanGu-α's vocab.model (bpe_4w_pcl)")
        if not is_pangu_alpha_vocabulary(processor):
            raise PanGuAlphaTokenizerError(f"{source}: not a PanGu-α vocabulary (<pad> at 6, <eot> at 9, U+2582 at "
                                           f"4 expected); give PanGu-α's vocab.model (bpe_4w_pcl)")
        self._processor = processor
        self._spaces = str.maketrans(" \n", SPACE + NEWLINE)
        self.model_bytes = model_bytes

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> List[int]:
        segments = [segment.translate(self._spaces) for segment in _jieba().cut(text, cut_all=False)]
        return self._processor.encode(" ".join(segments), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        text = self._processor.decode([int(i) for i in ids])
        return text.replace(" ", "").replace(SPACE, " ").replace(NEWLINE, "\n")
