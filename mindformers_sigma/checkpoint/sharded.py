"""Sharded checkpoints: each rank's slices in the step's folder, committed by one sidecar.

A step of a run whose model is split (model or expert parallel) is, in ``OUT/checkpoints``:

* ``step_NNNNNNNN/rank_R.ckpt`` (or ``.safetensors``): rank R's slices, under the whole
  parameters' names, written atomically by rank R, with ``rank_R.json`` (its sha256);
* ``step_NNNNNNNN/strategy.json``: the layout in MindSpore's strategy-file format
  (``mindspore.transform_checkpoints`` reads it; ``parallel/strategy_file.py``);
* ``step_NNNNNNNN.json``: the sidecar, written by rank 0 once every rank's part is on disk (a
  collective barrier first): the commit mark, as for a one-file checkpoint.  It records the layout
  and every part's sha256.

A rank killed mid-save leaves no sidecar, so ``--resume auto`` takes the step before.  Reading
merges the parts into whole tensors by ``names.split_axes`` (each slice from the lowest rank that
holds it), so every command that takes ``--ckpt`` reads a sharded step as it reads one file, and a
resumed run slices the whole tensors for its own layout, whatever the layout that wrote them.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Mapping, Optional

import mindspore as ms
import numpy as np

from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.checksum import file_sha256
from mindformers_sigma.distributed.topology import Topology, holders
from mindformers_sigma.model import names

LAYOUT = "sharded_layout"  # sidecar field: {data_parallel, model_parallel, expert_parallel, vocab_parallel}
PARTS = "shard_sha256"  # sidecar field: [sha256 of rank 0's part, rank 1's, ...]
STRATEGY_FILE = "strategy.json"


def part_name(rank: int, suffix: str) -> str:
    return f"rank_{rank}{suffix}"


def part_record_name(rank: int) -> str:
    return f"rank_{rank}.json"


def write_part_record(folder: str, rank: int, weights: str) -> None:
    write_bytes_atomic(os.path.join(folder, part_record_name(rank)),
                       json.dumps({"weights": os.path.basename(weights), "sha256": file_sha256(weights)}).encode())


def read_part_records(folder: str, world: int) -> list:
    """Every rank's sha256, in rank order; ValueError naming the first rank whose part is missing."""
    found = []
    for rank in range(world):
        try:
            with open(os.path.join(folder, part_record_name(rank)), encoding="utf-8") as handle:
                found.append(json.load(handle)["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{folder}: rank {rank}'s part is missing or unfinished") from None
    return found


def layout_of(meta: Mapping) -> Topology:
    layout = meta[LAYOUT]
    return Topology(layout["data_parallel"], layout["model_parallel"], layout["expert_parallel"])


def verify_parts(folder: str, meta: Mapping, suffix: str) -> None:
    """ValueError with a one-line reason when a part is missing or differs from its recorded sha256."""
    expected = meta.get(PARTS)
    topology = layout_of(meta)
    if not isinstance(expected, list) or len(expected) != topology.world_size:
        raise ValueError(f"field {PARTS} does not list one sha256 per rank of the layout")
    for rank, digest in enumerate(expected):
        part = os.path.join(folder, part_name(rank, suffix))
        if not os.path.isfile(part):
            raise ValueError(f"{part}: rank {rank}'s part is missing")
        if file_sha256(part) != digest:
            raise ValueError(f"{part}: sha256 does not match the sidecar (truncated or corrupt)")


def merge_parts(folder: str, meta: Mapping, fmt: str, suffix: str,
                keep: Optional[Callable[[str], bool]] = None) -> Dict[str, np.ndarray]:
    """Whole tensors from the parts (only names for which ``keep(name)`` is true when given)."""
    topology = layout_of(meta)
    vocab_parallel = bool(meta[LAYOUT]["vocab_parallel"])
    pieces = holders(topology.data_parallel, topology.model_parallel, topology.expert_parallel)
    parts = {rank: ms.load_checkpoint(os.path.join(folder, part_name(rank, suffix)), format=fmt, choice_func=keep)
             for rank in sorted(set(pieces.values()))}
    merged = {}
    for name, first in parts[0].items():
        axes = names.split_axes(name, len(first.shape), vocab_parallel)
        if all(axis is None for axis in axes):
            merged[name] = first.asnumpy()
            continue

        def joined(expert: int) -> np.ndarray:
            if "model" not in axes:
                return parts[pieces[(0, expert)]][name].asnumpy()
            return np.concatenate([parts[pieces[(model, expert)]][name].asnumpy()
                                   for model in range(topology.model_parallel)], axis=axes.index("model"))

        merged[name] = (np.concatenate([joined(e) for e in range(topology.expert_parallel)], axis=0)
                        if "expert" in axes else joined(0))
    return merged
