"""Prompts from the command line or a file, tokenized and checked against the model they feed."""

from __future__ import annotations

from typing import List, Optional, Tuple

from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.kinds import AnyTokenizer

MAX_PROMPT_FILE_BYTES = 64 * 2 ** 20


def require_utf8(text: str, where: str) -> str:
    """Command-line text that is valid UTF-8 (the shell passes undecodable bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: not UTF-8 text (character {err.start}); pass UTF-8, or use a file") from None
    return text


def read_prompt_file(path: str) -> List[Tuple[str, str]]:
    """``(where, text)`` per non-empty line of ``path`` (one prompt per line, UTF-8; whitespace is text,
    as in code)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as err:
        raise DataError(f"--prompt-file {path}: cannot read it ({err.strerror}); give a text file, one prompt "
                        f"per line") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise DataError(f"--prompt-file {path}: larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB; split it")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not prompt text
    except UnicodeDecodeError as err:
        raise DataError(f"--prompt-file {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))  # CRLF files too
    prompts = [(f"{path}:{number}", line) for number, line in enumerate(lines, 1) if line]
    if not prompts:
        raise DataError(f"--prompt-file {path}: holds no prompt; write one prompt per line")
    return prompts


def encode_prompts(prompts: List[Tuple[str, str]], tokenizer: Optional[AnyTokenizer], seq_length: int,
                   eod_token_id: int) -> List[List[int]]:
    """Token ids per prompt; an empty prompt, one holding the end-of-document token, or one too long to
    leave room for a new token is one line naming it."""
    if tokenizer is None:
        raise DataError("--ckpt: its model was trained on synthetic token ids and has no tokenizer; train on "
                        "prepare-data output to generate text")
    encoded = []
    for where, text in prompts:
        ids = tokenizer.encode(require_utf8(text, where)) if text else []
        if not ids:
            raise DataError(f"{where}: the prompt is empty; give some text to continue")
        if eod_token_id in ids:
            raise DataError(f"{where}: the prompt holds the end-of-document token (id {eod_token_id}); a prompt "
                            f"is one document, remove it")
        if len(ids) >= seq_length:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens, the model's sequence length is "
                            f"{seq_length}; shorten it to at most {seq_length - 1} tokens")
        encoded.append(ids)
    return encoded
