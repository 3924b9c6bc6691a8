"""Sharded checkpoints: each rank's slices in the step's folder, committed by one sidecar.

A step of a run whose model is split (model or expert parallel) is, in ``OUT/checkpoints``:

* ``step_NNNNNNNN/rank_R/part.ckpt`` (or ``.safetensors``): rank R's slices, under the whole
  parameters' names, written atomically by rank R, then ``rank_R.json`` (its sha256); the
  ``rank_R/`` folders are the layout ``mindspore.transform_checkpoints`` reads;
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
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.model import names
from mindformers_sigma.model.initial_values import full_shape, piece_of

LAYOUT = "sharded_layout"  # sidecar field: {data_parallel, model_parallel, expert_parallel, vocab_parallel, optimizer_shard}
PARTS = "shard_sha256"  # sidecar field: [sha256 of rank 0's part, rank 1's, ...]
STRATEGY_FILE = "strategy.json"


def part_name(rank: int, suffix: str) -> str:
    return os.path.join(f"rank_{rank}", f"part{suffix}")


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


_COUNTS = ("data_parallel", "model_parallel", "expert_parallel")
_FLAGS = ("vocab_parallel", "optimizer_shard")


def check_layout(meta: Mapping) -> None:
    """ValueError unless the sidecar's layout is well formed and is the one its recorded config trained with
    (the config is covered by the sidecar's description digest; the layout decides how parts merge)."""
    layout = meta.get(LAYOUT)
    if not isinstance(layout, dict) or any(type(layout.get(key)) is not int or layout[key] < 1 for key in _COUNTS) \
            or any(type(layout.get(key)) is not bool for key in _FLAGS):
        raise ValueError(f"field {LAYOUT} = {layout!r} is not a layout (data/model/expert_parallel counts, "
                         f"vocab_parallel and optimizer_shard flags)")
    recorded = meta.get("config", {}).get("parallel") if isinstance(meta.get("config"), dict) else None
    if isinstance(recorded, dict) and any(recorded.get(key) != layout[key] for key in _COUNTS + _FLAGS):
        raise ValueError(f"field {LAYOUT} = {layout} is not the layout of the recorded config's parallel section")


def verify_parts(folder: str, meta: Mapping, suffix: str) -> None:
    """ValueError with a one-line reason when the layout is malformed, or a part is missing or differs from its
    recorded sha256."""
    check_layout(meta)
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
    """Whole tensors from the parts (only names for which ``keep(name)`` is true when given): each rank's
    piece written where it sits in the whole tensor (its model and expert slice, and with the optimizer
    shard its rows of a moment)."""
    layout = layout_of(meta)
    vocab_parallel = bool(meta[LAYOUT]["vocab_parallel"])
    parts = [ms.load_checkpoint(os.path.join(folder, part_name(rank, suffix)), format=fmt, choice_func=keep)
             for rank in range(layout.world_size)]
    merged = {}
    for name, first in parts[0].items():
        base = name.split(".", 1)[1] if names.is_moment(name) else name
        base_shape = tuple(parts[0][base].shape) if base in parts[0] else tuple(first.shape)
        whole = np.zeros(full_shape(name, base_shape, layout, vocab_parallel), first.asnumpy().dtype)
        for rank, part in enumerate(parts):
            topology = Topology(layout.data_parallel, layout.model_parallel, layout.expert_parallel, rank)
            piece = part[name].asnumpy()
            whole[piece_of(name, whole.shape, piece.shape, topology, vocab_parallel)] = piece
        merged[name] = whole
    return merged
