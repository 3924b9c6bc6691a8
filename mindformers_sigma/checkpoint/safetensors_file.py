"""safetensors files written and read tensor by tensor, in chunks.

MindSpore's own safetensors writer builds every tensor's bytes in memory before writing, and a
memory-mapped ECSS expert store (``ecss.host_store: mmap``) may be larger than RAM.  This writer
streams each array in chunks (a memory-mapped one is read through the page cache, never copied
whole), and :func:`copy_tensor` reads one tensor of a file into an array in chunks.  The files are
standard safetensors (``u64`` header length, JSON header, raw little-endian data) with MindSpore's
metadata, so ``mindspore.load_checkpoint(..., format="safetensors")`` reads them (tested).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Tuple

import numpy as np

CHUNK_BYTES = 64 * 2 ** 20
MAX_HEADER_BYTES = 100 * 2 ** 20  # as the safetensors reference reader: a larger header is a damaged file
_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_DTYPES = {name: dtype for dtype, name in _NAMES.items()}
METADATA = {"format": "ms"}  # what MindSpore writes


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message says what is wrong."""


def _rows(array: np.ndarray):
    """The array as consecutive C-order byte chunks of about CHUNK_BYTES."""
    flat = np.ascontiguousarray(array).reshape(-1)
    step = max(1, CHUNK_BYTES // max(1, flat.itemsize))
    for start in range(0, flat.size, step):
        yield memoryview(flat[start:start + step]).cast("B")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (names sorted, as MindSpore does) to ``path``."""
    header: Dict[str, object] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        array = tensors[name]
        if array.dtype not in _NAMES or array.dtype.byteorder == ">":
            raise SafetensorsError(f"{name}: dtype {array.dtype} has no little-endian safetensors name")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = METADATA
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name in names:
            for chunk in _rows(tensors[name]):
                handle.write(chunk)


def read_header(path: str) -> Tuple[int, Dict[str, dict]]:
    """(where the data starts, ``{name: {dtype, shape, data_offsets}}``) of a safetensors file,
    checked: every tensor's bytes lie inside the file and match its dtype and shape."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        first = handle.read(8)
        if len(first) < 8:
            raise SafetensorsError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", first)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{name}: malformed header entry {str(entry)[:80]}") from None
        if not (0 <= begin <= end <= size - start and end - begin == expected):
            raise SafetensorsError(f"{name}: data_offsets {[begin, end]} do not hold {shape} {entry['dtype']} "
                                   f"inside the file")
    return start, header


def tensor_info(entry: dict) -> Tuple[np.dtype, Tuple[int, ...]]:
    return _DTYPES[entry["dtype"]], tuple(entry["shape"])


def copy_tensor(path: str, start: int, entry: dict, out: np.ndarray) -> None:
    """Copy one tensor of the file into ``out`` (same dtype and shape), a chunk at a time."""
    dtype, shape = tensor_info(entry)
    if out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
        raise SafetensorsError(f"a {entry['dtype']} tensor of shape {list(shape)} cannot be copied into "
                               f"{out.dtype} {list(out.shape)}")
    source = np.memmap(path, dtype=dtype, mode="r", offset=start + entry["data_offsets"][0], shape=shape)
    flat_in, flat_out = source.reshape(-1), out.reshape(-1)
    step = max(1, CHUNK_BYTES // dtype.itemsize)
    for begin in range(0, flat_in.size, step):
        flat_out[begin:begin + step] = flat_in[begin:begin + step]
    del source
