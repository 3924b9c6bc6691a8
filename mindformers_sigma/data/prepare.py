"""`pangu-sigma prepare-data`: documents per domain -> tokenizer, packed MindRecord shards, manifest.

A document is one line's ``text`` of a .jsonl file, or a whole file of any other kind (text
or source code).

Every sample is ``seq_length + 1`` tokens from one domain only: documents are tokenized,
each is followed by EOD, a domain's documents are concatenated and cut into samples, and
the last sample is filled up with EOD (EOD inputs carry no loss).  The whole output folder
is built aside and renamed into place (so it may hold only prepare-data's own files), and the
same input gives byte-identical output.
"""

from __future__ import annotations

import codecs
import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import re
import tempfile
from typing import Dict, List, NoReturn, Optional, Sequence, Tuple

import numpy as np

from mindformers_sigma.atomic import atomic_directory, remove_stale_temporaries
from mindformers_sigma.checksum import file_sha256
from mindformers_sigma.data.manifest import (HELDOUT, INDEX_SUFFIX, MANIFEST, MANIFEST_FORMAT, TOKENIZER_FILE,
                                             files_written_by_prepare, is_domain_name)
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.kinds import AnyTokenizer, read_tokenizer
from mindformers_sigma.tokenizer.sentencepiece_bpe import EOD_ID, Tokenizer, train_tokenizer

DEFAULT_PATTERNS = ("*.txt", "*.jsonl")
PAGE_SIZE = 1 << 16
SAMPLES_PER_SHARD = 4096
MAX_SEQ_LENGTH = 1 << 20
# File names are at most 255 bytes; the temporary beside --out adds ".", ".tmp-HOST-PID-" and 8 more.
MAX_NAME_BYTES = 160
MIN_VOCAB_SIZE = 300  # 256 byte pieces + 7 special pieces + room for merges
# SentencePiece's vocab_size is an int32 and every domain gets a vocab_size-long frequency table;
# real tokenizers have 32k-256k pieces, so anything above 2**20 is a typo, not a plan.
MAX_VOCAB_SIZE = 1 << 20
_TOO_FEW_PIECES = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")
_TOO_MANY_PIECES = re.compile(r"too high \(\d+\)\. Please set it to a value <= (\d+)")


@dataclasses.dataclass
class DomainDocuments:
    """The documents read for one domain, with what was skipped and where they came from."""

    name: str
    documents: List[str] = dataclasses.field(default_factory=list)
    files: List[dict] = dataclasses.field(default_factory=list)
    skipped: Dict[str, int] = dataclasses.field(
        default_factory=lambda: {"empty": 0, "binary": 0, "invalid_utf8": 0, "bad_json": 0})
    provenance: Dict[Tuple[str, str], int] = dataclasses.field(default_factory=dict)


def parse_domain_args(values: Sequence[str]) -> List[Tuple[str, str]]:
    """``NAME=PATH`` pairs from repeated ``--domain``; names must be unique identifiers."""
    pairs, seen = [], set()
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec:
            raise DataError(f"--domain {value!r}: expected NAME=PATH (a file, folder or glob)")
        if not is_domain_name(name):
            raise DataError(f"--domain {value[:80]!r}: domain name {name[:80]!r} must be 1-64 letters, digits, '_' or "
                            f"'-'")
        if name in seen:
            raise DataError(f"--domain {value!r}: domain {name!r} given twice; merge its paths into one glob or folder")
        seen.add(name)
        pairs.append((name, spec))
    if not pairs:
        raise DataError("--domain: give at least one NAME=PATH")
    return pairs


def parse_include_args(values: Sequence[str]) -> List[str]:
    """File-name patterns from repeated ``--include GLOB[,GLOB...]``."""
    patterns = []
    for value in values:
        for pattern in value.split(","):
            pattern = pattern.strip()
            if not pattern:
                raise DataError(f"--include {value!r}: empty pattern; give file-name patterns such as '*.py,*.c'")
            if "/" in pattern or os.sep in pattern:
                raise DataError(f"--include {value!r}: {pattern!r} has a folder in it, but patterns match file "
                                f"names only; put folders in --domain NAME=PATH")
            patterns.append(pattern)
    return patterns


def resolve_files(name: str, spec: str, patterns: Sequence[str] = DEFAULT_PATTERNS) -> List[str]:
    """The sorted files that ``spec`` names: the file itself, or those in a folder or glob whose
    name matches one of ``patterns``.  Hidden folders (``.git``, ``.venv``) are not walked."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        files = []
        for root, folders, names in os.walk(spec):
            folders[:] = [f for f in folders if not f.startswith(".")]
            files += [os.path.join(root, f) for f in names]
    elif any(ch in spec for ch in "*?["):
        files = glob.glob(spec, recursive=True)
    else:
        raise DataError(f"--domain {name}={spec}: no such file or folder; check the path")
    files = sorted(f for f in files if os.path.isfile(f)
                   and any(fnmatch.fnmatchcase(os.path.basename(f), p) for p in patterns))
    if not files:
        raise DataError(f"--domain {name}={spec}: no files named {' or '.join(patterns)} there; "
                        f"add file-name patterns with --include (e.g. --include '*.py,*.c')")
    return files


def _decode(raw: bytes) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _add_document(domain: DomainDocuments, raw: bytes) -> None:
    if b"\x00" in raw:
        domain.skipped["binary"] += 1
        return
    text = _decode(raw)
    if text is None:
        domain.skipped["invalid_utf8"] += 1
        return
    _add_text(domain, text, "", "")


def _add_text(domain: DomainDocuments, text: str, source: str, license_: str) -> None:
    if not text.strip():
        domain.skipped["empty"] += 1
        return
    if "\x00" in text:
        domain.skipped["binary"] += 1
        return
    domain.documents.append(text)
    key = (source, license_)
    domain.provenance[key] = domain.provenance.get(key, 0) + 1


def _provenance_field(record: dict, key: str) -> str:
    """A JSON null means no source or license, not the text 'None'."""
    value = record.get(key)
    return "" if value is None else str(value)


def printable_path(path: str) -> str:
    """A path as JSON text can hold it: bytes of a non-UTF-8 file name are written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_domain(name: str, spec: str, patterns: Sequence[str] = DEFAULT_PATTERNS) -> DomainDocuments:
    """Read every document of a domain: each line's ``text`` of a .jsonl file is one, any other
    file is one document as a whole (binaries and invalid UTF-8 are skipped and counted)."""
    domain = DomainDocuments(name)
    for path in resolve_files(name, spec, patterns):
        with open(path, "rb") as handle:
            raw = handle.read()
        domain.files.append({"path": printable_path(path), "sha256": hashlib.sha256(raw).hexdigest(),
                             "bytes": len(raw)})
        if not path.endswith(".jsonl"):
            _add_document(domain, raw)
            continue
        if raw.startswith(codecs.BOM_UTF8):  # written by Windows tools; json.loads rejects it
            raw = raw[len(codecs.BOM_UTF8):]
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            text = _decode(line)
            if text is None:
                domain.skipped["invalid_utf8"] += 1
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                domain.skipped["bad_json"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                domain.skipped["bad_json"] += 1
                continue
            _add_text(domain, record["text"], _provenance_field(record, "source"), _provenance_field(record, "license"))
    if not domain.documents:
        raise DataError(f"--domain {name}={spec}: no usable text (skipped: "
                        f"{', '.join(f'{k} {v}' for k, v in domain.skipped.items() if v) or 'nothing'}); "
                        f"give UTF-8 text files or .jsonl lines with a 'text' field")
    return domain


def pack_samples(token_documents: Sequence[Sequence[int]], sample_length: int, eod_id: int = EOD_ID) -> np.ndarray:
    """Concatenate documents, each followed by EOD, into ``[n, sample_length]`` int32 rows.

    The final row is filled up with EOD, so no token is lost.
    """
    stream = np.fromiter((t for doc in token_documents for t in (*doc, eod_id)), dtype=np.int32)
    rows = -(-stream.shape[0] // sample_length)
    packed = np.full(rows * sample_length, eod_id, dtype=np.int32)
    packed[: stream.shape[0]] = stream
    return packed.reshape(rows, sample_length)


def unpack_documents(samples: np.ndarray, eod_id: int = EOD_ID) -> List[List[int]]:
    """Inverse of :func:`pack_samples`: the token lists between EODs (EOD fill dropped)."""
    stream = samples.reshape(-1)
    ends = np.flatnonzero(stream == eod_id)
    documents, start = [], 0
    for end in ends:
        if end > start:
            documents.append(stream[start:end].tolist())
        start = end + 1
    return documents


def _write_shards(out_dir: str, domain_id: int, name: str, samples: np.ndarray, prefix: str = "") -> List[str]:
    from mindspore.mindrecord import FileWriter

    files = []
    for index, start in enumerate(range(0, samples.shape[0], SAMPLES_PER_SHARD)):
        file_name = f"{prefix}{domain_id:03d}-{name}-{index:05d}.mindrecord"
        writer = FileWriter(os.path.join(out_dir, file_name), shard_num=1, overwrite=True)
        writer.set_header_size(PAGE_SIZE)
        writer.set_page_size(PAGE_SIZE)
        writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "domain_id": {"type": "int32"}},
                          "pangu_sigma_samples")
        writer.write_raw_data([{"input_ids": row, "domain_id": domain_id}
                               for row in samples[start:start + SAMPLES_PER_SHARD]])
        writer.commit()
        files.append(file_name)
    return files


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary size SentencePiece cannot or should not train, before reading any text."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size}: must be >= {MIN_VOCAB_SIZE} "
                        f"(256 byte pieces + specials + merges)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size}: must be <= {MAX_VOCAB_SIZE} (2**20): SentencePiece stores "
                        f"it as an int32 and every domain gets a table of that many token counts, while real "
                        f"tokenizers have 32k-256k pieces")


def check_output_folder(out_dir: str) -> None:
    """Refuse, before the slow steps, an ``--out`` that cannot be created or replaced."""
    def refuse(reason: str) -> NoReturn:
        raise DataError(f"--out {out_dir}: cannot write there ({reason}); choose a folder you can write to")

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        refuse("it exists and is not a folder")
    if os.path.islink(out_dir):
        refuse(f"it is a symbolic link, which would be replaced by a folder; pass {os.path.realpath(out_dir)}")
    target, here = os.path.realpath(out_dir), os.path.realpath(os.getcwd())
    if here == target or here.startswith(target + os.sep):
        refuse("it holds the current folder, which would be moved away; run from elsewhere or choose a subfolder")
    if len(os.path.basename(os.path.abspath(out_dir)).encode()) > MAX_NAME_BYTES:
        refuse(f"its name is longer than {MAX_NAME_BYTES} bytes, the limit that leaves room for the temporary name")
    nearest = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        refuse(f"{nearest} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as err:
        refuse(f"{nearest}: {err.strerror}")


def _refuse_foreign_files(out_dir: str) -> None:
    """The output folder is replaced as a whole, so it may hold nothing but prepare-data's own files."""
    try:
        entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    except OSError as err:
        raise DataError(f"--out {out_dir}: cannot list the folder ({err.strerror}); choose another --out") from None
    if not entries:
        return
    owned = files_written_by_prepare(out_dir)
    if owned is None:
        raise DataError(f"--out {out_dir}: holds {entries[0]} but no readable prepare-data {MANIFEST}, and the "
                        f"folder would be replaced as a whole; choose an empty or new folder")
    foreign = [entry for entry in entries if entry not in owned]
    if foreign:
        raise DataError(f"--out {out_dir}: holds {foreign[0]}, which prepare-data did not write (its {MANIFEST} "
                        f"does not list it), and the folder would be replaced as a whole; move it away or "
                        f"choose another --out")


def _train(documents: Sequence[DomainDocuments], vocab_size: int) -> bytes:
    """Train the tokenizer; SentencePiece's refusals become advice in the right direction."""
    try:
        return train_tokenizer((doc for domain in documents for doc in domain.documents), vocab_size)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        too_few, too_many = _TOO_FEW_PIECES.search(reason), _TOO_MANY_PIECES.search(reason)
        if too_few:
            raise DataError(f"--vocab-size {vocab_size}: too small for the text, whose characters and special "
                            f"pieces need {too_few.group(1)}; give a larger --vocab-size "
                            f"(at least {too_few.group(1)})") from None
        if too_many:
            raise DataError(f"--vocab-size {vocab_size}: too large for the text, which yields at most "
                            f"{too_many.group(1)} pieces; give a smaller --vocab-size "
                            f"(at most {too_many.group(1)}) or more text") from None
        raise DataError(f"--vocab-size {vocab_size}: SentencePiece could not train "
                        f"({reason.split('] ', 1)[-1]}); check the input text") from None


def split_heldout(documents: List[str], fraction: float, seed: int, domain_id: int) -> Tuple[List[str], List[str]]:
    """(training, held-out) documents: ``round(fraction * n)`` whole documents drawn by ``(seed, domain)``
    (at least one when ``fraction > 0``, never all of them), each list in the original order."""
    count = len(documents)
    held = min(count - 1, max(1, round(fraction * count))) if fraction > 0 and count > 1 else 0
    chosen = set(np.random.default_rng([seed, domain_id]).permutation(count)[:held].tolist())
    return ([doc for i, doc in enumerate(documents) if i not in chosen],
            [doc for i, doc in enumerate(documents) if i in chosen])


def _pack_and_write(tmp: str, tokenizer: AnyTokenizer, documents: List[str], domain_id: int, name: str,
                    sample_length: int, prefix: str = "") -> Tuple[dict, np.ndarray, int]:
    """Tokenize, pack and write one split of one domain: (manifest counts and shards, samples, stream tokens)."""
    token_docs = [tokenizer.encode(doc) for doc in documents]
    samples = pack_samples(token_docs, sample_length, tokenizer.eod_id)
    shards = _write_shards(tmp, domain_id, name, samples, prefix)
    stream_tokens = sum(len(doc) + 1 for doc in token_docs)
    entry = {"documents": len(documents), "tokens": stream_tokens, "samples": int(samples.shape[0]),
             "shards": [{"file": f, "sha256": file_sha256(os.path.join(tmp, f)), "index_file": f + INDEX_SUFFIX,
                         "index_sha256": file_sha256(os.path.join(tmp, f + INDEX_SUFFIX))} for f in shards]}
    return entry, samples, stream_tokens


def prepare_data(domains: Sequence[Tuple[str, str]], out_dir: str, seq_length: int,
                 vocab_size: Optional[int] = None, tokenizer_path: Optional[str] = None,
                 tokenizer_kind: Optional[str] = None, include: Sequence[str] = (), holdout: float = 0.0, holdout_seed: int = 0) -> dict:
    """Run the whole pipeline and return the manifest that was written to ``out_dir``.

    ``tokenizer_kind``: the kind of the ``tokenizer_path`` model (``tokenizer/kinds.py``); None recognises it.
    ``include`` adds file-name patterns to the default ``*.txt``/``*.jsonl`` for folders and globs.
    ``holdout``: the share of each domain's documents set aside, whole, into the held-out split
    (``heldout-*`` shards, each domain's ``heldout`` manifest entry); the tokenizer, the training
    shards and the token frequencies never see them.
    Every check that needs no text runs before the text is read and the tokenizer trained.
    """
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"--holdout {holdout}: must be a fraction in [0, 1), e.g. 0.1")
    if not 2 <= seq_length <= MAX_SEQ_LENGTH:
        raise DataError(f"--seq-length {seq_length}: must be in [2, {MAX_SEQ_LENGTH:,}] (samples hold seq_length + 1 "
                        f"tokens; attention over S tokens needs S x S scores)")
    if (vocab_size is None) == (tokenizer_path is None):
        raise DataError("give exactly one of --vocab-size N (train a tokenizer) or --tokenizer MODEL")
    if vocab_size is not None:
        check_vocab_size(vocab_size)
    check_output_folder(out_dir)
    out_path = os.path.abspath(out_dir)
    # A killed earlier run left .<out>.tmp-* beside it; this may also put back a folder it was replacing.
    remove_stale_temporaries(os.path.dirname(out_path), re.escape(os.path.basename(out_path)))
    _refuse_foreign_files(out_dir)
    patterns = (*DEFAULT_PATTERNS, *include)
    read = [read_domain(name, spec, patterns) for name, spec in domains]
    heldout_documents = []
    for domain_id, domain in enumerate(read):
        domain.documents, held = split_heldout(domain.documents, holdout, holdout_seed, domain_id)
        heldout_documents.append(held)
    if tokenizer_path is not None:
        tokenizer = read_tokenizer(tokenizer_path, tokenizer_kind)
    else:
        tokenizer = Tokenizer(_train(read, vocab_size))
    model_bytes = tokenizer.model_bytes

    manifest_domains = []
    with atomic_directory(out_path) as tmp:
        with open(os.path.join(tmp, TOKENIZER_FILE), "wb") as handle:
            handle.write(model_bytes)
        for domain_id, domain in enumerate(read):
            entry, samples, stream_tokens = _pack_and_write(tmp, tokenizer, domain.documents, domain_id, domain.name,
                                                            seq_length + 1)
            frequency = np.bincount(samples.reshape(-1)[:stream_tokens], minlength=tokenizer.vocab_size)
            heldout = {}
            if holdout > 0:
                heldout = {HELDOUT: _pack_and_write(tmp, tokenizer, heldout_documents[domain_id], domain_id,
                                                    domain.name, seq_length + 1, prefix="heldout-")[0]}
            manifest_domains.append({
                "id": domain_id,
                "name": domain.name,
                "documents": entry["documents"],
                "tokens": entry["tokens"],
                "samples": entry["samples"],
                "skipped": domain.skipped,
                "shards": entry["shards"],
                **heldout,
                "sources": domain.files,
                "provenance": [{"source": s, "license": lic, "documents": n}
                               for (s, lic), n in sorted(domain.provenance.items()) if s or lic],
                "token_frequency": {"ids": np.flatnonzero(frequency).tolist(),
                                    "counts": frequency[frequency > 0].tolist()},
            })
        manifest = {
            "format": MANIFEST_FORMAT,
            "seq_length": seq_length,
            "sample_length": seq_length + 1,
            "eod_token_id": tokenizer.eod_id,
            "tokenizer": {"file": TOKENIZER_FILE, "kind": tokenizer.kind,
                          "sha256": hashlib.sha256(model_bytes).hexdigest(), "vocab_size": tokenizer.vocab_size,
                          "trained": tokenizer_path is None},
            "domains": manifest_domains,
            **({"holdout": {"fraction": holdout, "seed": holdout_seed}} if holdout > 0 else {}),
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, ensure_ascii=False)
            handle.write("\n")
    return manifest
