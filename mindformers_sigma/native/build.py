"""Build a C source into a shared library once per machine and version, and find it again.

The library is built with the system C compiler (``$CC``, else ``cc`` or ``gcc``) into a cache folder
(``$PANGU_SIGMA_CACHE``, else ``~/.cache/mindformers_sigma``; the temporary folder if that is not
writable), named by the source's and flags' sha256 and written atomically (a temporary file, then a
rename), so concurrent first uses never load a half-written file.  A cached file that does not load
(damaged on disk) is built again.  Without a compiler the caller falls back to its reference path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence


def _cache_dirs() -> list:
    """Where a library may be cached: the user's cache, then (a read-only home) the temporary folder."""
    home = os.environ.get("PANGU_SIGMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mindformers_sigma")
    return [home, os.path.join(tempfile.gettempdir(), f"mindformers_sigma-{os.getuid()}")]


def built_library(source: str, flags: Sequence[str]) -> Optional[str]:
    """The path of ``source`` built with ``flags`` (and ``-lm``), built into the cache unless there already;
    None without a compiler or when the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    name = os.path.splitext(os.path.basename(source))[0]
    with open(source, "rb") as handle:
        digest = hashlib.sha256(handle.read() + " ".join(flags).encode()).hexdigest()[:16]
    for folder in _cache_dirs():
        target = os.path.join(folder, f"{name}-{digest}.so")
        if os.path.isfile(target):
            if _loads(target):
                return target
            with contextlib.suppress(OSError):
                os.unlink(target)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".so")
            os.close(fd)
            break
        except OSError:
            continue
    else:
        return None
    try:
        done = subprocess.run([compiler, *flags, source, "-o", tmp, "-lm"], capture_output=True, timeout=120)
        if done.returncode != 0:
            return None
        os.replace(tmp, target)
        return target if _loads(target) else None
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _loads(path: str) -> bool:
    """Whether the dynamic loader accepts ``path`` (MindSpore would fail inside graph compilation)."""
    try:
        ctypes.CDLL(path)
        return True
    except OSError:
        return False
