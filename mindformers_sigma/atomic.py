"""Atomic outputs: write to a temporary file or folder beside the target, fsync, then rename.

Temporaries are named ``.<target>.tmp-<host>-<pid>-<random>`` (``.old-`` for a folder being
replaced), so a later run can tell the leftovers of a killed writer (same host, process gone)
from those of a writer that is still running, and remove only the former
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from typing import Iterator, List, Optional

_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-")


def _permissions(base: int) -> int:
    """``base`` filtered by the process umask, as open()/mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _prefix(target: str, kind: str) -> str:
    return f".{os.path.basename(target)}.{kind}-{_host()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str, target_pattern: str = r".+") -> List[str]:
    """Remove the temporaries in ``directory`` whose target matches ``target_pattern`` and whose
    writer (on this host) no longer runs; returns the removed paths.

    A writer killed between the two renames of :func:`atomic_directory` leaves the previous
    folder inside an ``.old-`` temporary and no target: that folder is put back, not removed.
    """
    removed: List[str] = []
    if not os.path.isdir(directory):
        return removed
    host = _host()
    for entry in sorted(os.listdir(directory)):
        match = _TEMPORARY.match(entry)
        if (not match or match.group("host") != host or not re.fullmatch(target_pattern, match.group("target"))
                or _process_alive(int(match.group("pid")))):
            continue
        path = os.path.join(directory, entry)
        target = os.path.join(directory, match.group("target"))
        previous = os.path.join(path, "previous")
        if match.group("kind") == "old" and os.path.isdir(previous) and not os.path.lexists(target):
            os.rename(previous, target)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix) for a writer to fill; on success it
    is fsynced and renamed over ``path``, on any error it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_prefix(path, "tmp"), suffix=os.path.splitext(path)[1])
    except OSError as err:
        raise _about(err, path, None) from None
    os.close(fd)
    os.chmod(tmp, _permissions(0o666))  # mkstemp makes 0600; the result should look like any new file
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _about(err, path, tmp) from None
        raise


@contextlib.contextmanager
def scratch_directory(directory: str, name: str) -> Iterator[str]:
    """A scratch folder in ``directory``, named as a temporary of ``name`` and removed after; one a killed
    process left is removed by the next ``remove_stale_temporaries(directory, re.escape(name))``."""
    try:
        path = tempfile.mkdtemp(dir=directory, prefix=_prefix(name, "tmp"))
    except OSError as err:
        raise _about(err, directory, None) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _about(err: OSError, path: str, tmp: Optional[str]) -> OSError:
    """The error as the user sees it: about ``path``, not the temporary name (a full disk names no file)."""
    if err.errno and (tmp is None or err.filename in (None, tmp)):
        return OSError(err.errno, err.strerror, path)
    return err


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never half."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces ``path``, on any error it is removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=_prefix(path, "tmp"))
    os.chmod(tmp, _permissions(0o777))  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=_prefix(path, "old"))
            os.rename(path, os.path.join(old, "previous"))
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
