"""sha256 of files, which checkpoints and prepared corpora record to catch damaged or swapped files."""

from __future__ import annotations

import hashlib

_CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    """sha256 of a file, read in chunks so that large shards need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
