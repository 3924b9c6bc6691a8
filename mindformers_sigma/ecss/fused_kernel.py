"""The fused host AdamW kernel (``fused_adamw.c``), compiled on first use and loaded with ctypes.

One pass over each touched expert's weights, gradient and moments: 28 bytes per float32 parameter
against about 130 for the numpy rule's array passes, split over the process's cores with POSIX
threads, and the GIL released while it runs.  The shared library is built once per machine and
version (``native/build.py``).  Without a compiler the numpy rule runs instead (``host_adamw.py``),
with one line on stderr saying so.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import numpy as np

from mindformers_sigma.native.build import built_library

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_adamw.c")
# no fast-math and no contraction into fused multiply-adds: each operation rounds as numpy's does; no errno from
# sqrtf (the moments are never negative), so the loop vectorizes
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno")

_FLOATS = np.ctypeslib.ndpointer(dtype=np.float32, flags="C_CONTIGUOUS")
_ROWS = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
_loaded: dict = {}


def fused_adamw() -> Optional[ctypes.CDLL]:
    """The loaded kernel, built on first use; None without a compiler."""
    if "library" in _loaded:
        return _loaded["library"]
    library = None
    path = built_library(SOURCE, FLAGS, "adamw_rows")
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
