"""Build a C source into a shared library once per machine and version, and find it again.

The library is built with the system C compiler (``$CC``, else ``cc`` or ``gcc``) into a cache folder
(``$PANGU_SIGMA_CACHE``, else ``~/.cache/mindformers_sigma``; the temporary folder if that is not
writable), named by the source's and flags' sha256 and written atomically (a temporary file, then a
rename), so concurrent first uses never load a half-written file.  Before a library is used a child
process loads it and looks up its entry point: a damaged file can crash the loader outright (a
truncated one raised SIGBUS), and MindSpore would fail inside graph compilation on a wrong one; such a
file is built again.  Without a compiler the caller falls back to its reference path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence


def _cache_dirs() -> list:
    """Where a library may be cached: the user's cache, then (a read-only home) the temporary folder."""
    home = os.environ.get("PANGU_SIGMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mindformers_sigma")
    return [home, os.path.join(tempfile.gettempdir(), f"mindformers_sigma-{os.getuid()}")]


def built_library(source: str, flags: Sequence[str], symbol: str) -> Optional[str]:
    """The path of ``source`` built with ``flags`` (and ``-lm``), built into the cache unless there already,
    that loads and exports ``symbol``; None without a compiler or when the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    name = os.path.splitext(os.path.basename(source))[0]
    with open(source, "rb") as handle:
        digest = hashlib.sha256(handle.read() + " ".join(flags).encode()).hexdigest()[:16]
    for folder in _cache_dirs():
        target = os.path.join(folder, f"{name}-{digest}.so")
        if os.path.isfile(target):
            if _loads(target, symbol):
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
        return target if _loads(target, symbol) else None
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _loads(path: str, symbol: str) -> bool:
    """Whether a child process loads ``path`` and finds ``symbol`` in it (a crash there is not this process's)."""
    check = "import ctypes, sys; getattr(ctypes.CDLL(sys.argv[1]), sys.argv[2])"
    try:
        return subprocess.run([sys.executable, "-c", check, path, symbol], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
