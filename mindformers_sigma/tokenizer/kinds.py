"""The tokenizer kinds a checkpoint or a prepared corpus can carry, by the name they record.

A tokenizer is stored as its SentencePiece model file plus its kind: ``sentencepiece_bpe`` (this
project's own, trained by prepare-data) or ``pangu_alpha`` (PanGu-α's jieba + SentencePiece).  Records
written before kinds existed name none and are ``sentencepiece_bpe``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Union

import sentencepiece as spm

from mindformers_sigma.errors import UserError
from mindformers_sigma.tokenizer import pangu_alpha, sentencepiece_bpe

AnyTokenizer = Union[sentencepiece_bpe.Tokenizer, pangu_alpha.PanGuAlphaTokenizer]
KINDS = {sentencepiece_bpe.KIND: sentencepiece_bpe.Tokenizer, pangu_alpha.KIND: pangu_alpha.PanGuAlphaTokenizer}
DEFAULT_KIND = sentencepiece_bpe.KIND


def load_tokenizer(model_bytes: bytes, source: str, kind: Optional[str] = None) -> AnyTokenizer:
    """The tokenizer of ``kind`` over ``model_bytes``; ``kind`` None: recognised from the vocabulary
    (PanGu-α's special pieces, else this project's own), for a bare ``.model`` file a user passes."""
    if kind is None:
        kind = pangu_alpha.KIND if _looks_like_pangu_alpha(model_bytes) else DEFAULT_KIND
    if kind not in KINDS:
        raise UserError(f"{source}: tokenizer kind {kind!r} is not one of {', '.join(sorted(KINDS))}; use an "
                        f"undamaged file written by this version")
    return KINDS[kind](model_bytes, source)


def read_tokenizer(path: str, kind: Optional[str] = None, flag: str = "") -> AnyTokenizer:
    """The tokenizer in file ``path``; ``flag``: the option that named it, for error lines."""
    source = f"{flag} {path}" if flag else path
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise UserError(f"{source}: cannot read tokenizer ({err.strerror})") from None
    return load_tokenizer(data, source, kind)


def _looks_like_pangu_alpha(model_bytes: bytes) -> bool:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except Exception:  # not a model at all: the default kind's loader says so in its own words
        return False
    return pangu_alpha.is_pangu_alpha_vocabulary(processor)


def pcl_pangu_vocabulary() -> str:
    """The real 40,000-piece PanGu-α vocabulary that the ``pcl-pangu`` package ships (found without
    importing the package, whose ``__init__`` needs more than the tokenizer)."""
    spec = importlib.util.find_spec("pcl_pangu")
    path = None if spec is None or not spec.submodule_search_locations else \
        os.path.join(list(spec.submodule_search_locations)[0], "tokenizer", "bpe_4w_pcl", "vocab.model")
    if path is None or not os.path.isfile(path):
        raise UserError(f"PanGu-α's vocabulary ships in pcl-pangu, which is not installed: install it with "
                        f"{pangu_alpha.INSTALL}, or pass --tokenizer VOCAB.model")
    return path
