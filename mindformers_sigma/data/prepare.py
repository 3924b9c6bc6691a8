"""`pangu-sigma prepare-data`: documents per domain -> tokenizer, packed MindRecord shards, manifest.

Every sample is ``seq_length + 1`` tokens from one domain only: documents are tokenized,
each is followed by EOD, a domain's documents are concatenated and cut into samples, and
the last sample is filled up with EOD (EOD inputs carry no loss).  The whole output folder
is built aside and renamed into place, and the same input gives byte-identical output.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mindformers_sigma.atomic import atomic_directory
from mindformers_sigma.data.tokenizer import EOD_ID, Tokenizer, train_tokenizer
from mindformers_sigma.errors import DataError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FORMAT = "mindformers_sigma.prepared/1"
TEXT_SUFFIXES = (".txt", ".jsonl")
PAGE_SIZE = 1 << 16
SAMPLES_PER_SHARD = 4096


@dataclasses.dataclass
class DomainDocuments:
    """The documents read for one domain, with what was skipped and where they came from."""

    name: str
    documents: List[str] = dataclasses.field(default_factory=list)
    files: List[Dict[str, str]] = dataclasses.field(default_factory=list)
    skipped: Dict[str, int] = dataclasses.field(
        default_factory=lambda: {"empty": 0, "binary": 0, "invalid_utf8": 0, "bad_json": 0})
    provenance: Dict[Tuple[str, str], int] = dataclasses.field(default_factory=dict)


def parse_domain_args(values: Sequence[str]) -> List[Tuple[str, str]]:
    """``NAME=PATH`` pairs from repeated ``--domain``; names must be unique identifiers."""
    pairs, seen = [], set()
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec:
            raise DataError(f"--domain {value!r}: expected NAME=PATH (a file, folder or glob of .txt/.jsonl)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise DataError(f"--domain {value!r}: domain name {name!r} must be letters, digits, '_' or '-'")
        if name in seen:
            raise DataError(f"--domain {value!r}: domain {name!r} given twice; merge its paths into one glob or folder")
        seen.add(name)
        pairs.append((name, spec))
    if not pairs:
        raise DataError("--domain: give at least one NAME=PATH")
    return pairs


def resolve_files(name: str, spec: str) -> List[str]:
    """The sorted .txt/.jsonl files that ``spec`` (file, folder or glob) names."""
    if os.path.isdir(spec):
        files = [os.path.join(root, f) for root, _, names in os.walk(spec) for f in names]
    elif any(ch in spec for ch in "*?["):
        files = glob.glob(spec, recursive=True)
    elif os.path.isfile(spec):
        if not spec.endswith(TEXT_SUFFIXES):
            raise DataError(f"--domain {name}={spec}: not a .txt or .jsonl file")
        files = [spec]
    else:
        raise DataError(f"--domain {name}={spec}: no such file or folder; check the path")
    files = sorted(f for f in files if f.endswith(TEXT_SUFFIXES) and os.path.isfile(f))
    if not files:
        raise DataError(f"--domain {name}={spec}: no .txt or .jsonl files there")
    return files


def _decode(raw: bytes) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _add_document(domain: DomainDocuments, raw: bytes, source: str = "", license_: str = "") -> None:
    if b"\x00" in raw:
        domain.skipped["binary"] += 1
        return
    text = _decode(raw)
    if text is None:
        domain.skipped["invalid_utf8"] += 1
        return
    _add_text(domain, text, source, license_)


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


def read_domain(name: str, spec: str) -> DomainDocuments:
    """Read every document of a domain: a .txt file is one document, a .jsonl line's ``text`` is one."""
    domain = DomainDocuments(name)
    for path in resolve_files(name, spec):
        with open(path, "rb") as handle:
            raw = handle.read()
        domain.files.append({"path": path, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": str(len(raw))})
        if path.endswith(".txt"):
            _add_document(domain, raw)
            continue
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
            _add_text(domain, record["text"], str(record.get("source", "")), str(record.get("license", "")))
    if not domain.documents:
        raise DataError(f"--domain {name}={spec}: no usable text (skipped: "
                        f"{', '.join(f'{k} {v}' for k, v in domain.skipped.items() if v) or 'nothing'}); "
                        f"give UTF-8 .txt files or .jsonl lines with a 'text' field")
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


def _write_shards(out_dir: str, domain_id: int, name: str, samples: np.ndarray) -> List[str]:
    from mindspore.mindrecord import FileWriter

    files = []
    for index, start in enumerate(range(0, samples.shape[0], SAMPLES_PER_SHARD)):
        file_name = f"{domain_id:03d}-{name}-{index:05d}.mindrecord"
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


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def prepare_data(domains: Sequence[Tuple[str, str]], out_dir: str, seq_length: int,
                 vocab_size: Optional[int] = None, tokenizer_path: Optional[str] = None) -> dict:
    """Run the whole pipeline and return the manifest that was written to ``out_dir``."""
    if seq_length < 2:
        raise DataError(f"--seq-length {seq_length}: must be >= 2 (samples hold seq_length + 1 tokens)")
    if (vocab_size is None) == (tokenizer_path is None):
        raise DataError("give exactly one of --vocab-size N (train a tokenizer) or --tokenizer MODEL")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise DataError(f"--out {out_dir}: exists and is not a prepare-data output; choose an empty or new folder")
    read = [read_domain(name, spec) for name, spec in domains]
    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(tokenizer_path)
        with open(tokenizer_path, "rb") as handle:
            model_bytes = handle.read()
    else:
        if vocab_size < 300:
            raise DataError(f"--vocab-size {vocab_size}: must be >= 300 (256 byte pieces + specials + merges)")
        try:
            model_bytes = train_tokenizer((doc for domain in read for doc in domain.documents), vocab_size)
        except RuntimeError as err:
            raise DataError(f"--vocab-size {vocab_size}: SentencePiece could not train "
                            f"({str(err).strip().splitlines()[-1]}); try a smaller vocabulary") from None
        tokenizer = Tokenizer(model_bytes)

    manifest_domains = []
    with atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, TOKENIZER_FILE), "wb") as handle:
            handle.write(model_bytes)
        for domain_id, domain in enumerate(read):
            token_docs = [tokenizer.encode(doc) for doc in domain.documents]
            samples = pack_samples(token_docs, seq_length + 1)
            shards = _write_shards(tmp, domain_id, domain.name, samples)
            stream_tokens = sum(len(doc) + 1 for doc in token_docs)
            frequency = np.bincount(samples.reshape(-1)[:stream_tokens], minlength=tokenizer.vocab_size)
            manifest_domains.append({
                "id": domain_id,
                "name": domain.name,
                "documents": len(domain.documents),
                "tokens": stream_tokens,
                "samples": int(samples.shape[0]),
                "skipped": domain.skipped,
                "shards": [{"file": f, "sha256": _sha256(os.path.join(tmp, f))} for f in shards],
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
            "eod_token_id": EOD_ID,
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": hashlib.sha256(model_bytes).hexdigest(),
                          "vocab_size": tokenizer.vocab_size,
                          "trained": tokenizer_path is None},
            "domains": manifest_domains,
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, ensure_ascii=False)
            handle.write("\n")
    return manifest

