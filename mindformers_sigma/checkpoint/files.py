"""Crash-safe checkpoints: weights file + JSON sidecar, each written atomically, last K kept.

A checkpoint ``step_NNNNNNNN`` is two files in ``OUT/checkpoints``:

* ``step_NNNNNNNN.ckpt`` or ``.safetensors``: every parameter of the train step: model weights
  (routing tables included), Adam moments (``adam_m.*``, ``adam_v.*``), the optimizer's
  ``global_step``, the loss scale and its clean-step counter;
* ``step_NNNNNNNN.json``: step, data position, config, data fingerprint, format and the weights' sha256.

A weights-only checkpoint (``NAME.ckpt`` + ``NAME.json``, step 0, ``weights_only``) holds the model
alone: the lifecycle commands write it, and training from it starts with fresh optimizer state.

The weights are written to a temporary file, fsynced and renamed; the sidecar is written the
same way *after* them, so it is the commit mark: a checkpoint without a sidecar, or whose
weights do not match the recorded sha256 (truncated, corrupt), is skipped on resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Collection, Dict, List, Mapping, Optional, Tuple, Union

import mindspore as ms
import numpy as np

from mindformers_sigma.atomic import atomic_file, write_bytes_atomic
from mindformers_sigma.checksum import file_sha256
from mindformers_sigma.errors import DataError
from mindformers_sigma.checkpoint import sharded
from mindformers_sigma.checkpoint.safetensors_file import (SafetensorsError, copy_tensor, read_header, tensor_info,
                                                         write_safetensors)

_NAME = re.compile(r"^step_(\d{8})\.json$")
_WEIGHTS = re.compile(r"^step_(\d{8})\.(?:ckpt|safetensors)$")
_FOLDER = re.compile(r"^step_(\d{8})$")
_ANY_FILE = re.compile(r"^step_(\d{8})\.(?:json|ckpt|safetensors)$")
SUFFIX = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


@dataclass
class CheckpointInfo:
    step: int
    data_position: int
    weights_path: str
    meta: dict


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_weights(weights: str, parameters: Mapping[str, Union[ms.Tensor, np.ndarray]], fmt: str) -> None:
    """One weights file, atomically."""
    with atomic_file(weights) as tmp:
        if fmt == "safetensors":
            write_safetensors(tmp, {name: value if isinstance(value, np.ndarray) else value.asnumpy()
                                    for name, value in parameters.items()})
        else:
            try:
                ms.save_checkpoint([{"name": name, "data": value if isinstance(value, ms.Tensor)
                                     else ms.Tensor.from_numpy(value)} for name, value in parameters.items()],
                                   tmp, format=fmt)
            finally:  # MindSpore writes STEM.tmp and renames it to STEM.ckpt: a failed write (a full disk) leaves it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.splitext(tmp)[0] + ".tmp")


def _write_pair(weights: str, parameters: Mapping[str, Union[ms.Tensor, np.ndarray]], record: dict, fmt: str) -> None:
    """The weights file, then its sidecar (the commit mark), each atomically, then the folder fsynced."""
    write_weights(weights, parameters, fmt)
    record = dict(record, format=fmt, weights=os.path.basename(weights), sha256=file_sha256(weights))
    write_bytes_atomic(os.path.splitext(weights)[0] + ".json", json.dumps(record, indent=1).encode() + b"\n")
    _fsync_dir(os.path.dirname(os.path.abspath(weights)))


def save_checkpoint(directory: str, step: int, parameters: Mapping[str, Union[ms.Tensor, np.ndarray]], meta: dict,
                    fmt: str, keep: int) -> str:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``.

    ``parameters`` may hold numpy arrays (ECSS's host store, possibly memory-mapped): a
    safetensors checkpoint streams them in chunks; a ckpt one goes through MindSpore's writer,
    which holds one whole tensor's bytes at a time.
    """
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, f"step_{step:08d}" + SUFFIX[fmt])
    _write_pair(weights, parameters, dict(meta, step=step), fmt)
    prune_checkpoints(directory, step, keep)
    return weights


def step_folder(directory: str, step: int) -> str:
    """Where a sharded checkpoint's parts are (``checkpoint/sharded.py``)."""
    return os.path.join(directory, f"step_{step:08d}")


def save_part(directory: str, step: int, rank: int, parameters: Mapping[str, Union[ms.Tensor, np.ndarray]],
              fmt: str) -> None:
    """Rank ``rank``'s slices of sharded checkpoint ``step``, atomically, then its record; not yet committed."""
    folder = step_folder(directory, step)
    weights = os.path.join(folder, sharded.part_name(rank, SUFFIX[fmt]))
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    write_weights(weights, parameters, fmt)
    sharded.write_part_record(folder, rank, weights)


def commit_sharded(directory: str, step: int, meta: dict, fmt: str, layout: dict, strategy: dict, keep: int) -> str:
    """Rank 0, once every rank has saved its part (after a barrier): the strategy file, then the sidecar
    that commits the step, then pruning.  ``layout``: data/model/expert parallel and vocab_parallel."""
    folder = step_folder(directory, step)
    topology = sharded.layout_of({sharded.LAYOUT: layout})
    try:
        parts = sharded.read_part_records(folder, topology.world_size)
    except ValueError as err:
        raise DataError(f"checkpoint step {step} not committed: {err}") from None
    strategy_path = os.path.join(folder, sharded.STRATEGY_FILE)
    write_bytes_atomic(strategy_path, json.dumps(strategy, indent=1, sort_keys=True).encode() + b"\n")
    _fsync_dir(folder)
    record = dict(meta, step=step, format=fmt, weights=os.path.basename(folder), sha256=file_sha256(strategy_path),
                  **{sharded.LAYOUT: layout, sharded.PARTS: parts})
    write_bytes_atomic(folder + ".json", json.dumps(record, indent=1).encode() + b"\n")
    _fsync_dir(directory)
    prune_checkpoints(directory, step, keep)
    return folder


def is_sharded(info: "CheckpointInfo") -> bool:
    return sharded.LAYOUT in info.meta


WEIGHTS_ONLY = "weights_only"


def save_weights_only(weights: str, parameters: Mapping[str, np.ndarray], meta: dict) -> None:
    """A model-only checkpoint at ``weights`` (any name ending in .ckpt or .safetensors) with its sidecar
    ``NAME.json``: step 0 and no optimizer state, so training from it starts fresh (``inherit``,
    ``extract``, ``add-domain``)."""
    fmt = next((name for name, suffix in SUFFIX.items() if weights.endswith(suffix)), None)
    if fmt is None:
        raise DataError(f"--out {weights}: a checkpoint file name ends in .ckpt or .safetensors")
    _write_pair(weights, parameters, dict(meta, step=0, data_position=0, **{WEIGHTS_ONLY: True}), fmt)


def prune_checkpoints(directory: str, newest: int, keep: int) -> None:
    """Keep the ``keep`` newest committed checkpoints up to step ``newest``; delete older ones and
    the uncommitted weights (no sidecar) of earlier steps.  Later steps are never touched: they
    belong to another run or were skipped as corrupt, and are not this run's to delete."""
    committed = [step for step in list_checkpoints(directory) if step <= newest]
    for old in committed[:-keep]:
        os.unlink(os.path.join(directory, f"step_{old:08d}.json"))  # the commit mark goes first
        for suffix in SUFFIX.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, f"step_{old:08d}{suffix}"))
        shutil.rmtree(step_folder(directory, old), ignore_errors=True)
    remove_uncommitted_weights(directory, below=newest)


def remove_uncommitted_weights(directory: str, below: int) -> None:
    """Delete weights files of steps before ``below`` that have no sidecar: a save killed between
    its two renames leaves them, and no resume can use them."""
    committed = set(list_checkpoints(directory))
    for entry in os.listdir(directory):
        match = _WEIGHTS.match(entry) or _FOLDER.match(entry)
        if match and int(match.group(1)) < below and int(match.group(1)) not in committed:
            path = os.path.join(directory, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def file_step(name: str) -> Optional[int]:
    """The step of a checkpoint file name (sidecar or weights), None for any other name."""
    match = _ANY_FILE.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str) -> List[int]:
    """Steps that have a sidecar, oldest first (validity is checked by :func:`read_checkpoint`)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)


def _checked_sidecar(meta_path: str, meta: object) -> CheckpointInfo:
    """The sidecar's fields, each of the type and form this module writes, or ValueError."""
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    step, position, fmt, weights = (meta.get(key) for key in ("step", "data_position", "format", "weights"))
    weights_only = meta.get(WEIGHTS_ONLY) is True
    stem = os.path.splitext(os.path.basename(meta_path))[0]
    if weights_only:  # any name; step 0
        expected_name, first_step, step_name = stem + SUFFIX.get(fmt, "?"), 0, stem
    else:
        suffix = "" if sharded.LAYOUT in meta else SUFFIX.get(fmt, "?")  # a sharded step's parts are in a folder
        expected_name = f"step_{step:08d}{suffix}" if isinstance(step, int) else None
        first_step, step_name = 1, f"step_{step:08d}" if isinstance(step, int) else None
    problems = [
        (isinstance(step, int) and not isinstance(step, bool) and step >= first_step and
         (step == 0 or not weights_only), "step"),
        (isinstance(position, int) and not isinstance(position, bool) and position >= 0, "data_position"),
        (fmt in SUFFIX, "format"),
        (weights == expected_name, "weights"),  # a bare name beside the sidecar, never a path elsewhere
        (isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64, "sha256"),
        (isinstance(meta.get("config", {}), dict), "config"),
        (stem == step_name, "step"),
    ]
    bad = [field for ok, field in problems if not ok]
    if bad:
        raise ValueError(f"field {bad[0]} = {meta.get(bad[0])!r} is not what a checkpoint holds")
    return CheckpointInfo(step, position, os.path.join(os.path.dirname(meta_path), weights), meta)


def read_checkpoint(meta_path: str) -> CheckpointInfo:
    """Parse and verify one checkpoint; raises ValueError with a one-line reason when unusable."""
    try:
        with open(meta_path, encoding="utf-8") as handle:
            info = _checked_sidecar(meta_path, json.load(handle))
    except (OSError, ValueError) as err:
        raise ValueError(f"{meta_path}: unusable sidecar ({err})") from None
    if is_sharded(info):
        strategy = os.path.join(info.weights_path, sharded.STRATEGY_FILE)
        try:
            if not os.path.isfile(strategy) or file_sha256(strategy) != info.meta["sha256"]:
                raise ValueError(f"{strategy}: missing, or its sha256 does not match the sidecar")
            sharded.verify_parts(info.weights_path, info.meta, SUFFIX[info.meta["format"]])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: unusable sidecar (bad field {err})") from None
        return info
    if not os.path.isfile(info.weights_path):
        raise ValueError(f"{info.weights_path}: weights file missing")
    if file_sha256(info.weights_path) != info.meta["sha256"]:
        raise ValueError(f"{info.weights_path}: sha256 does not match its sidecar (truncated or corrupt)")
    return info


def find_resume_checkpoint(directory: str, log: Callable[[str], None]) -> Optional[CheckpointInfo]:
    """The newest valid checkpoint; each unusable newer one is reported in one line and skipped."""
    for step in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(os.path.join(directory, f"step_{step:08d}.json"))
        except ValueError as err:
            log(f"resume: skipping checkpoint step {step}: {err}")
    return None


def _unreadable(info: CheckpointInfo, err: Exception) -> DataError:
    return DataError(f"{info.weights_path}: cannot be read as a {info.meta['format']} checkpoint "
                     f"({str(err).splitlines()[0][:160]}); resume from another checkpoint")


def load_parameters(info: CheckpointInfo, skip: Collection[str] = ()) -> Dict[str, ms.Parameter]:
    """The checkpoint's tensors but those named in ``skip``; a file MindSpore cannot parse (its
    sha256 matched the sidecar, so it was written unreadable, or the sidecar was rewritten) is
    one error line, not a traceback."""
    skipped = frozenset(skip)
    choose = (lambda name: name not in skipped) if skipped else None
    if is_sharded(info):
        return {name: ms.Parameter(ms.Tensor(array), name=name) for name, array in read_tensors(info, choose).items()}
    try:
        return ms.load_checkpoint(info.weights_path, format=info.meta["format"], choice_func=choose)
    except (ValueError, RuntimeError, TypeError) as err:
        raise _unreadable(info, err) from None


def read_part(info: CheckpointInfo, rank: int) -> Dict[str, np.ndarray]:
    """Rank ``rank``'s part of a sharded step, as written (its slices)."""
    path = os.path.join(info.weights_path, sharded.part_name(rank, SUFFIX[info.meta["format"]]))
    try:
        stored = ms.load_checkpoint(path, format=info.meta["format"])
    except (ValueError, RuntimeError, TypeError) as err:
        raise _unreadable(info, err) from None
    return {name: value.asnumpy() for name, value in stored.items()}


def read_tensors(info: CheckpointInfo, choose: Optional[Callable[[str], bool]] = None) -> Dict[str, np.ndarray]:
    """The checkpoint's tensors (those ``choose`` accepts) as whole numpy arrays, a sharded step's merged."""
    try:
        if is_sharded(info):
            return sharded.merge_parts(info.weights_path, info.meta, info.meta["format"], SUFFIX[info.meta["format"]],
                                       choose)
        stored = ms.load_checkpoint(info.weights_path, format=info.meta["format"], choice_func=choose)
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise _unreadable(info, err) from None
    return {name: value.asnumpy() for name, value in stored.items()}


def copy_into(info: CheckpointInfo, targets: Mapping[str, np.ndarray], source: str,
              stored: Optional[Mapping[str, np.ndarray]] = None) -> None:
    """Overwrite each array of ``targets`` with the checkpoint's tensor of that name, which must
    have its dtype and shape (one error line naming the first that does not, or is missing);
    ``stored``: those tensors already read (and cut to this rank's slices).

    A safetensors checkpoint is read tensor by tensor in chunks, so targets that are memory-mapped
    files never pass through RAM whole; a ckpt one is parsed whole by MindSpore.
    """
    def check(name: str, have: Optional[Tuple[np.dtype, Tuple[int, ...]]], target: np.ndarray) -> None:
        if have != (target.dtype, target.shape):
            found = "missing" if have is None else f"{have[0]} of shape {have[1]}"
            raise DataError(f"{source}: {name} is {found}, the model needs {target.dtype} of shape "
                            f"{target.shape}; was it written with another config?")

    if info.meta["format"] == "safetensors" and not is_sharded(info) and stored is None:
        try:
            start, header = read_header(info.weights_path)
        except (OSError, SafetensorsError) as err:
            raise _unreadable(info, err) from None
        for name, target in targets.items():
            check(name, tensor_info(header[name]) if name in header else None, target)
            copy_tensor(info.weights_path, start, header[name], target)
        return
    wanted = frozenset(targets)
    if stored is None:
        stored = read_tensors(info, lambda name: name in wanted)
    for name, target in targets.items():
        array = stored.get(name)
        check(name, None if array is None else (array.dtype, array.shape), target)
        target[...] = array
