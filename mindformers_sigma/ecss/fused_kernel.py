"""The fused host AdamW kernel (``fused_adamw.c``), compiled on first use and loaded with ctypes.

One pass over each touched expert's weights, gradient and moments: 28 bytes per float32 parameter
against about 130 for the numpy rule's array passes, split over the process's cores with POSIX
threads, and the GIL released while it runs.  The shared library is built with the system C
compiler (``cc``) into a cache folder (``$PANGU_SIGMA_CACHE``, else ``~/.cache/mindformers_sigma``; the
temporary folder if that is not writable), named by the source's and flags' sha256 and written
atomically, so it is built once per machine and version.  Without a compiler the
numpy rule runs instead (``host_adamw.py``), with one line on stderr saying so.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_adamw.c")
# no fast-math and no contraction into fused multiply-adds: each operation rounds as numpy's does; no errno from
# sqrtf (the moments are never negative), so the loop vectorizes
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno")

_FLOATS = np.ctypeslib.ndpointer(dtype=np.float32, flags="C_CONTIGUOUS")
_ROWS = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
_loaded: dict = {}


def _cache_dirs() -> list:
    """Where the library may be cached: the user's cache, then (a read-only home) the temporary folder."""
    home = os.environ.get("PANGU_SIGMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mindformers_sigma")
    return [home, os.path.join(tempfile.gettempdir(), f"mindformers_sigma-{os.getuid()}")]


def _build(compiler: str, flags: tuple) -> Optional[str]:
    """The shared library for ``flags``, built into the cache unless there already; None if it fails."""
    with open(SOURCE, "rb") as handle:
        digest = hashlib.sha256(handle.read() + " ".join(flags).encode()).hexdigest()[:16]
    for folder in _cache_dirs():
        target = os.path.join(folder, f"fused_adamw-{digest}.so")
        if os.path.isfile(target):
            return target
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fused_adamw-", suffix=".so")
            os.close(fd)
            break
        except OSError:
            continue
    else:
        return None
    try:
        done = subprocess.run([compiler, *flags, SOURCE, "-o", tmp, "-lm"], capture_output=True, timeout=120)
        if done.returncode != 0:
            return None
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fused_adamw() -> Optional[ctypes.CDLL]:
    """The loaded kernel, built on first use; None without a compiler."""
    if "library" in _loaded:
        return _loaded["library"]
    library = None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    path = _build(compiler, FLAGS) if compiler else None
    if path is not None:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            library = None
    if library is None:
        print("ecss: no C compiler built the fused host AdamW (fused_adamw.c); the numpy rule runs instead, about "
              "4x slower", file=sys.stderr)
    else:
        library.adamw_rows.restype = None
        library.adamw_rows.argtypes = [_FLOATS, _FLOATS, _FLOATS, _FLOATS, _ROWS, _ROWS, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                                       ctypes.c_float, ctypes.c_int64]
        library.stream_update.restype = None
        library.stream_update.argtypes = [_FLOATS, _FLOATS, _FLOATS, _FLOATS, ctypes.c_int64, ctypes.c_int64]
    _loaded["library"] = library
    return library


def host_threads() -> int:
    """The cores this process may run on: the kernel's threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
