"""Reading an official PanGu-α release from disk: one checkpoint file, or a sharded release merged.

A release is one of:
* a ``.ckpt`` file;
* a folder with one ``.ckpt`` in it;
* a folder of per-rank files (``rank_N/*.ckpt``, or flat files numbered ``*_N.ckpt`` such as PCL's
  ``filerted_N.ckpt``) plus the strategy file they were saved with (``--strategy``).  These are merged by
  ``mindspore.transform_checkpoints`` in a scratch folder beside the output, which is removed after.
A folder may also hold PCL's separately shipped tables (``word_embedding.npy``, ``position_embedding.npy``,
``top_query_embedding.npy``), which fill in tables the checkpoint lacks.  Half-precision tensors are read
as float32.  Optimizer state, step counters and ``use_past`` caches are skipped unread.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
from typing import Dict, Iterator, List, Optional

import numpy as np

from mindformers_sigma.atomic import remove_stale_temporaries, scratch_directory
from mindformers_sigma.errors import DataError, one_line
from mindformers_sigma.pangu_alpha.namings import Naming, is_weight

# PCL's separately shipped tables, and which table each fills
NPY_TABLES = {"word_embedding.npy": "word", "position_embedding.npy": "position",
              "top_query_embedding.npy": "top_query"}
_NUMBERED = re.compile(r"(\d+)\.ckpt$")
MERGE_SCRATCH = "pangu-alpha-merge"  # the scratch folder's name (a killed import's is removed by the next)
FLOATS = ("float16", "float32", "float64", "bfloat16")


@contextlib.contextmanager
def _noting_interrupts() -> Iterator[list]:
    """Ctrl-C noted as it arrives: MindSpore's checkpoint reader turns it into a ValueError, which must stay
    an interrupt, not pass for a damaged file."""
    noted: list = []

    def note(signum, frame):
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _load(path: str, flag: str) -> Dict[str, np.ndarray]:
    """The weights of one checkpoint file as float32 numpy arrays (each converted as soon as it is read out)."""
    import mindspore as ms

    with _noting_interrupts() as interrupted:
        try:
            stored = ms.load_checkpoint(path, choice_func=is_weight)
        except (ValueError, RuntimeError, TypeError, OSError) as err:
            if interrupted:
                raise KeyboardInterrupt from None
            raise DataError(one_line(f"{flag} {path}: cannot be read as a MindSpore checkpoint "
                                     f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); "
                                     f"is it truncated? download it again")) from None
    tensors = {}
    for name in list(stored):
        parameter = stored.pop(name)  # drop MindSpore's copy as each float32 one is made
        if str(parameter.dtype).lower() not in FLOATS:
            raise DataError(f"{flag} {path}: tensor {name} is {parameter.dtype}; PanGu-α's weights are floating point "
                            f"(is it another model's checkpoint?)")
        value = parameter.asnumpy() if parameter.dtype in (ms.float32, ms.float16, ms.float64) \
            else parameter.astype(ms.float32).asnumpy()
        tensors[name] = value.astype(np.float32, copy=False)
    return tensors


def _rank_files(folder: str) -> List[str]:
    """The release's checkpoint files: its one file, or its per-rank parts in rank order ([] when none)."""
    ranked = {}
    for sub in glob.glob(os.path.join(folder, "rank_*")):
        match = re.fullmatch(r"rank_(\d+)", os.path.basename(sub))
        if not (match and os.path.isdir(sub)):
            continue
        files = glob.glob(os.path.join(sub, "*.ckpt"))
        if len(files) != 1:
            raise DataError(f"--ckpt {folder}: {sub} holds {len(files)} .ckpt files; each rank_N folder of a sharded "
                            f"release holds its one part")
        ranked[int(match.group(1))] = files[0]
    flat = glob.glob(os.path.join(folder, "*.ckpt"))
    if ranked and flat:
        raise DataError(f"--ckpt {folder}: holds both rank_N folders and loose .ckpt files "
                        f"({os.path.basename(flat[0])}); keep only one release's parts in the folder")
    if len(flat) == 1:
        return flat
    for path in flat:  # flat parts: NAME_N.ckpt, one per rank
        match = _NUMBERED.search(os.path.basename(path))
        if match is None or int(match.group(1)) in ranked:
            raise DataError(f"--ckpt {folder}: {os.path.basename(path)} is not one rank's numbered part "
                            f"(NAME_N.ckpt, one per rank); keep only a release's part files in the folder")
        ranked[int(match.group(1))] = path
    if ranked and sorted(ranked) != list(range(len(ranked))):
        missing = min(set(range(max(ranked) + 1)) - set(ranked))
        raise DataError(f"--ckpt {folder}: rank {missing}'s part is missing ({len(ranked)} parts, up to rank "
                        f"{max(ranked)}); copy every part of the release")
    return [ranked[rank] for rank in sorted(ranked)]


def _merged(parts: List[str], strategy: str, scratch_parent: str) -> Dict[str, np.ndarray]:
    """The whole tensors of a sharded release, merged by MindSpore from its parts and strategy file."""
    import mindspore as ms

    with scratch_directory(scratch_parent, MERGE_SCRATCH) as scratch:
        for rank, part in enumerate(parts):
            os.makedirs(os.path.join(scratch, "parts", f"rank_{rank}"))
            os.symlink(os.path.abspath(part), os.path.join(scratch, "parts", f"rank_{rank}", "part.ckpt"))
        try:
            with contextlib.redirect_stdout(None), _noting_interrupts() as interrupted:
                ms.transform_checkpoints(os.path.join(scratch, "parts"), os.path.join(scratch, "merged"), "merged",
                                         strategy, None)
        except Exception as err:  # noqa: BLE001 - MindSpore raises many kinds for a strategy file it cannot use
            if interrupted:
                raise KeyboardInterrupt from None
            raise DataError(one_line(f"--strategy {strategy}: MindSpore could not merge the {len(parts)} parts with "
                                     f"it ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__}); "
                                     f"give the strategy file the release was saved with")) from None
        merged = glob.glob(os.path.join(scratch, "merged", "rank_0", "*.ckpt"))
        if len(merged) != 1:
            raise DataError(f"--strategy {strategy}: MindSpore's merge wrote no checkpoint; give the strategy file "
                            f"the release was saved with")
        return _load(merged[0], "--ckpt (merged)")


def _tables(folder: str) -> Dict[str, np.ndarray]:
    """PCL's separately shipped tables in ``folder``, by the table they fill (word, position, top_query)."""
    found = {}
    for file_name, table in NPY_TABLES.items():
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            try:
                found[table] = np.load(path, allow_pickle=False).astype(np.float32, copy=False)
            except (ValueError, OSError, EOFError) as err:
                raise DataError(one_line(f"--ckpt {path}: cannot be read as a numpy table ({err}); download it "
                                         f"again")) from None
    return found


def read_release(path: str, strategy: Optional[str], scratch_parent: str) -> tuple:
    """(official-named float32 weights, PCL tables by role) of the release at ``path``."""
    if not os.path.exists(path):
        raise DataError(f"--ckpt {path}: no such file or folder; give a PanGu-α .ckpt file or a release folder")
    if strategy is not None and not os.path.isfile(strategy):
        raise DataError(f"--strategy {strategy}: no such file; give the strategy file the release was saved with")
    remove_stale_temporaries(scratch_parent, re.escape(MERGE_SCRATCH))
    if os.path.isfile(path):
        if strategy is not None:
            raise DataError(f"--strategy {strategy}: --ckpt {path} is one whole file; a strategy file is for a "
                            f"folder of per-rank parts (drop --strategy)")
        return _load(path, "--ckpt"), {}
    parts = _rank_files(path)
    tables = _tables(path)
    if not parts:
        raise DataError(f"--ckpt {path}: holds no .ckpt file; give a PanGu-α .ckpt file or a release folder")
    if len(parts) == 1:
        return _load(parts[0], "--ckpt"), tables
    if strategy is None:
        raise DataError(f"--ckpt {path}: holds {len(parts)} per-rank parts; pass --strategy with the strategy file "
                        f"they were saved with, to merge them")
    return _merged(parts, strategy, scratch_parent), tables


def place_tables(weights: Dict[str, np.ndarray], tables: Dict[str, np.ndarray], naming: Naming) -> None:
    """Fill the tables the checkpoint lacks from PCL's .npy files, under ``naming``'s names."""
    for role, table in tables.items():
        weights.setdefault(getattr(naming, role), table)
