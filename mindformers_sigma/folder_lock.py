"""An exclusive, non-blocking lock on a folder: one writer at a time (a training run's ``--out``, a
launch's log folder).  The lock file records the holder's pid; the lock lasts as long as the
returned file stays open, and the kernel releases it when the process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import os
from typing import TextIO


class FolderBusy(Exception):
    """Another process holds the lock; ``holder`` is its pid as it recorded it ("?" if unknown)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_folder(folder: str, name: str) -> TextIO:
    """Lock ``folder/name`` (created if needed) and write our pid into it; OSError if it cannot be opened."""
    handle = open(os.path.join(folder, name), "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise FolderBusy(holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
