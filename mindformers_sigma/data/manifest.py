"""``manifest.json`` of a prepare-data folder: checked in full when opened, and its files against it.

A damaged or edited manifest would otherwise surface as a KeyError, an IndexError deep in the
trainer, or (a damaged shard handed to MindSpore) a segmentation fault.  So :func:`load_manifest`
checks every key, type and cross-field rule, and :func:`verify_files` checks every shard, its
index file and the tokenizer against their sha256 before any of them is read.  Each problem is
one line ``PATH: field: problem; rerun prepare-data``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, NoReturn, Optional, Set, Tuple

from mindformers_sigma.checksum import file_sha256
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.kinds import DEFAULT_KIND, KINDS, AnyTokenizer, read_tokenizer

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
TRAIN, HELDOUT = "train", "heldout"  # the splits; training reads only TRAIN
MANIFEST_FORMAT = "mindformers_sigma.prepared/2"
# /1 listed no index files, so its .mindrecord.db files could not be checked.
PREVIOUS_FORMATS = ("mindformers_sigma.prepared/1",)
FORMAT_FAMILY = "mindformers_sigma.prepared/"
SHARD_SUFFIX = ".mindrecord"
INDEX_SUFFIX = ".db"  # MindRecord writes X.mindrecord and its index X.mindrecord.db
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


MAX_DOMAIN_NAME = 64


def is_domain_name(name: str) -> bool:
    """Domain names become part of shard file names: letters, digits, '_' and '-' only, at most 64 of them."""
    return bool(name) and len(name) <= MAX_DOMAIN_NAME and name.replace("_", "").replace("-", "").isalnum()


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


class _ManifestChecker:
    """Reads fields of one manifest and reports the first bad one as ``PATH: field: problem``."""

    _KINDS = {int: "an integer", str: "a string", bool: "true or false", list: "a list", dict: "an object"}

    def __init__(self, path: str):
        self.path = path

    def fail(self, field: str, problem: str) -> NoReturn:
        raise DataError(f"{self.path}: {field}: {problem}; rerun prepare-data")

    def value(self, record: dict, key: str, kind: type, where: str = "") -> Any:
        field = f"{where}.{key}" if where else key
        if key not in record:
            self.fail(field, "missing")
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(field, f"is {_describe(value)}, expected {self._KINDS[kind]}")
        return value

    def count(self, record: dict, key: str, where: str, minimum: int = 0) -> int:
        value = self.value(record, key, int, where)
        if value < minimum:
            self.fail(f"{where}.{key}" if where else key, f"is {value}, expected >= {minimum}")
        return value

    def sha256(self, record: dict, key: str, where: str) -> str:
        value = self.value(record, key, str, where)
        if not _SHA256.match(value):
            self.fail(f"{where}.{key}", f"is {_describe(value)}, expected 64 lowercase hex digits")
        return value

    def file_name(self, record: dict, key: str, where: str) -> str:
        value = self.value(record, key, str, where)
        if value in ("", ".", "..") or os.path.basename(value) != value:
            self.fail(f"{where}.{key}", f"is {_describe(value)}, expected a file name inside the folder")
        return value

    def objects(self, record: dict, key: str, where: str) -> List[dict]:
        items = self.value(record, key, list, where)
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                self.fail(f"{where}.{key}[{index}]", f"is {_describe(item)}, expected an object")
        return items

    def integers(self, record: dict, key: str, where: str) -> List[int]:
        items = self.value(record, key, list, where)
        for index, item in enumerate(items):
            if type(item) is not int:  # noqa: E721 - bool is an int subclass and must not pass
                self.fail(f"{where}.{key}[{index}]", f"is {_describe(item)}, expected an integer")
        return items


def validate_manifest(manifest: Any, path: str) -> Dict[str, Any]:
    """Check every key, type and cross-field rule of a parsed manifest; return it unchanged."""
    check = _ManifestChecker(path)
    if not isinstance(manifest, dict):
        check.fail("(top level)", f"is {_describe(manifest)}, expected an object")
    found_format = check.value(manifest, "format", str)
    if found_format in PREVIOUS_FORMATS:
        raise DataError(f"{path}: written by an earlier prepare-data (format {found_format!r}, this version reads "
                        f"{MANIFEST_FORMAT!r}); rerun prepare-data")
    if found_format != MANIFEST_FORMAT:
        check.fail("format", f"is {_describe(found_format)}, expected {MANIFEST_FORMAT!r}")
    seq_length = check.count(manifest, "seq_length", "", minimum=2)
    if check.value(manifest, "sample_length", int) != seq_length + 1:
        check.fail("sample_length", f"is {manifest['sample_length']}, expected seq_length + 1 = {seq_length + 1}")
    tokenizer = check.value(manifest, "tokenizer", dict)
    check.file_name(tokenizer, "file", "tokenizer")
    check.sha256(tokenizer, "sha256", "tokenizer")
    vocab_size = check.count(tokenizer, "vocab_size", "tokenizer", minimum=1)
    check.value(tokenizer, "trained", bool, "tokenizer")
    if tokenizer.get("kind", DEFAULT_KIND) not in KINDS:
        check.fail("tokenizer.kind", f"is {_describe(tokenizer['kind'])}, expected one of {', '.join(sorted(KINDS))}")
    eod = check.count(manifest, "eod_token_id", "")
    if eod >= vocab_size:
        check.fail("eod_token_id", f"is {eod}, outside the tokenizer vocabulary of {vocab_size}")
    domains = check.objects(manifest, "domains", "")
    if not domains:
        check.fail("domains", "is empty, expected at least one domain")
    names: Set[str] = set()
    files: Set[str] = {MANIFEST, tokenizer["file"]}
    for index, domain in enumerate(domains):
        _validate_domain(check, domain, index, vocab_size, names, files)
    return manifest


def _validate_shards(check: _ManifestChecker, record: dict, where: str, files: Set[str], allow_empty: bool) -> None:
    """``record["shards"]``: shard and index file names (each listed once in the whole manifest) and sha256s."""
    shards = check.objects(record, "shards", where)
    if not shards and not allow_empty:
        check.fail(f"{where}.shards", "is empty, expected at least one shard")
    for number, shard in enumerate(shards):
        at = f"{where}.shards[{number}]"
        shard_file = check.file_name(shard, "file", at)
        if not shard_file.endswith(SHARD_SUFFIX):
            check.fail(f"{at}.file", f"is {_describe(shard_file)}, expected a {SHARD_SUFFIX} file")
        index_file = check.file_name(shard, "index_file", at)
        if index_file != shard_file + INDEX_SUFFIX:
            check.fail(f"{at}.index_file", f"is {_describe(index_file)}, expected {shard_file + INDEX_SUFFIX!r} "
                                           f"(MindRecord reads the index beside its shard)")
        for listed in (shard_file, index_file):
            if listed in files:
                check.fail(f"{at}.file", f"{listed!r} is listed twice")
            files.add(listed)
        check.sha256(shard, "sha256", at)
        check.sha256(shard, "index_sha256", at)


def _validate_domain(check: _ManifestChecker, domain: dict, index: int, vocab_size: int,
                     names: Set[str], files: Set[str]) -> None:
    where = f"domains[{index}]"
    domain_id = check.value(domain, "id", int, where)
    if domain_id != index:
        check.fail(f"{where}.id", f"is {domain_id}, expected {index} (domain ids are 0..n-1 in order)")
    name = check.value(domain, "name", str, where)
    if not is_domain_name(name):
        check.fail(f"{where}.name", f"is {_describe(name)}, expected 1-64 letters, digits, '_' or '-'")
    if name in names:
        check.fail(f"{where}.name", f"{name!r} names two domains")
    names.add(name)
    for key in ("documents", "tokens", "samples"):
        check.count(domain, key, where)
    skipped = check.value(domain, "skipped", dict, where)
    for reason in skipped:
        check.count(skipped, reason, f"{where}.skipped")
    _validate_shards(check, domain, where, files, allow_empty=False)
    if HELDOUT in domain:
        heldout = check.value(domain, HELDOUT, dict, where)
        for key in ("documents", "tokens", "samples"):
            check.count(heldout, key, f"{where}.{HELDOUT}")
        _validate_shards(check, heldout, f"{where}.{HELDOUT}", files, allow_empty=heldout["samples"] == 0)
    for number, source in enumerate(check.objects(domain, "sources", where)):
        check.value(source, "path", str, f"{where}.sources[{number}]")
        check.sha256(source, "sha256", f"{where}.sources[{number}]")
        check.count(source, "bytes", f"{where}.sources[{number}]")
    for number, entry in enumerate(check.objects(domain, "provenance", where)):
        check.value(entry, "source", str, f"{where}.provenance[{number}]")
        check.value(entry, "license", str, f"{where}.provenance[{number}]")
        check.count(entry, "documents", f"{where}.provenance[{number}]")
    frequency = check.value(domain, "token_frequency", dict, where)
    at = f"{where}.token_frequency"
    ids = check.integers(frequency, "ids", at)
    counts = check.integers(frequency, "counts", at)
    if len(ids) != len(counts):
        check.fail(f"{at}.counts", f"has {len(counts)} entries but ids has {len(ids)}")
    for number, (token, count) in enumerate(zip(ids, counts)):
        if not 0 <= token < vocab_size:
            check.fail(f"{at}.ids[{number}]", f"is {token}, outside the tokenizer vocabulary of {vocab_size}")
        if number and token <= ids[number - 1]:
            check.fail(f"{at}.ids[{number}]", f"is {token}, expected ids in increasing order without repeats")
        if count < 0:
            check.fail(f"{at}.counts[{number}]", f"is {count}, expected >= 0")


def split_shards(domain: Dict[str, Any], split: str) -> List[dict]:
    """A validated domain's shards of ``split``: ``train`` (what training reads) or ``heldout``."""
    return domain["shards"] if split == TRAIN else domain.get(HELDOUT, {}).get("shards", [])


def load_manifest(data_dir: str) -> Dict[str, Any]:
    """Read and fully validate ``data_dir/manifest.json`` (one line per problem, never a traceback)."""
    path = os.path.join(data_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `pangu-sigma prepare-data --out {data_dir}` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); rerun prepare-data") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    return validate_manifest(manifest, path)


def _verify(path: str, expected: str, what: str, manifest_path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} listed in {manifest_path} is missing; rerun prepare-data")
    if file_sha256(path) != expected:
        raise DataError(f"{path}: {what} does not match its sha256 in {manifest_path} (damaged or changed "
                        f"after prepare-data wrote it); rerun prepare-data")


def verify_files(manifest: Dict[str, Any], data_dir: str) -> None:
    """Check every shard and index file (and the tokenizer, if present) against its sha256.

    Run before any shard reaches MindSpore's FileReader: a damaged shard crashes it.
    """
    manifest_path = os.path.join(data_dir, MANIFEST)
    for domain in manifest["domains"]:
        for shard in split_shards(domain, TRAIN) + split_shards(domain, HELDOUT):
            what = f"shard of domain {domain['name']!r}"
            _verify(os.path.join(data_dir, shard["file"]), shard["sha256"], what, manifest_path)
            _verify(os.path.join(data_dir, shard["index_file"]), shard["index_sha256"],
                    f"MindRecord index of the {what}", manifest_path)
    tokenizer_path = os.path.join(data_dir, manifest["tokenizer"]["file"])
    if os.path.exists(tokenizer_path):  # optional for training; the vocabulary size is in the manifest
        _verify(tokenizer_path, manifest["tokenizer"]["sha256"], "tokenizer", manifest_path)


def files_written_by_prepare(data_dir: str) -> Optional[Set[str]]:
    """The names in ``data_dir`` that its manifest says prepare-data wrote; None without a
    readable prepare-data manifest.

    Read leniently, so that a manifest with a bad field, or one of an earlier format, does not
    block the prepare-data rerun that replaces it.
    """
    path = os.path.join(data_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(FORMAT_FAMILY):
        return None
    owned = {MANIFEST}
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("file"), str):
        owned.add(tokenizer["file"])
    domains = manifest.get("domains")
    for domain in domains if isinstance(domains, list) else []:
        shards = domain.get("shards") if isinstance(domain, dict) else None
        heldout = domain.get(HELDOUT) if isinstance(domain, dict) else None
        heldout_shards = heldout.get("shards") if isinstance(heldout, dict) else None
        for shard in (shards if isinstance(shards, list) else []) + \
                (heldout_shards if isinstance(heldout_shards, list) else []):
            if isinstance(shard, dict) and isinstance(shard.get("file"), str):
                owned.update((shard["file"], shard["file"] + INDEX_SUFFIX))
    return owned


def tokenizer_kind(manifest: Dict[str, Any]) -> str:
    """The kind of a validated manifest's tokenizer (``tokenizer/kinds.py``; older manifests name none)."""
    return manifest["tokenizer"].get("kind", DEFAULT_KIND)


def read_corpus_tokenizer(data_dir: str, manifest: Dict[str, Any]) -> AnyTokenizer:
    """The tokenizer a prepared folder was tokenized with."""
    return read_tokenizer(os.path.join(data_dir, manifest["tokenizer"]["file"]), tokenizer_kind(manifest))


def domains_and_tokenizer(data_dir: str) -> Tuple[List[str], AnyTokenizer]:
    """A prepared folder's domain names in id order and its tokenizer (what an older checkpoint, which
    does not record them, was trained with)."""
    manifest = load_manifest(data_dir)
    domains = [domain["name"] for domain in sorted(manifest["domains"], key=lambda d: d["id"])]
    return domains, read_corpus_tokenizer(data_dir, manifest)
