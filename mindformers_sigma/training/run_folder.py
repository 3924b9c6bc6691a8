"""The run folder (``--out``): who may write there, and what a new run does with an old one.

* One writer at a time: the main rank holds an ``flock`` on ``OUT/.lock`` for the whole run.
* A used folder is never mixed with a new run silently: without ``--resume`` it must be empty
  (or hold no run outputs) unless ``--overwrite`` is given, which removes the previous run's
  outputs (``metrics.jsonl``, ``loss.png``, ``checkpoints/step_*``) and nothing else.
* Temporaries of a killed run (``.step_*.tmp-*``, ``.metrics.jsonl.tmp-*``...) are removed at
  start: while the lock is held nobody else can be writing them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import List, Optional

from mindformers_sigma.checkpoint.files import file_step, remove_uncommitted_weights
from mindformers_sigma.errors import DataError
from mindformers_sigma.folder_lock import FolderBusy, lock_folder

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
LOCK = ".lock"
ECSS_STORE = "ecss_store"  # the memory-mapped expert store (ecss.host_store: mmap): scratch, never an output
# Temporaries written beside run outputs (atomic.py's names, and the names older versions used).
_TEMPORARY = re.compile(r"^\.(step_\d{8}\.\w+|metrics\.jsonl|loss\.png)\.(tmp|old)-|^metrics\.jsonl\.tmp$|"
                        r"^loss\.png\.tmp\.png$")


def _cannot_write(out_dir: str, err: OSError) -> DataError:
    return DataError(f"--out {out_dir}: cannot write there ({err.strerror or err}); pass a writable folder")


class RunFolder:
    """An ``--out`` folder opened for one run; keep the object alive to keep the lock."""

    def __init__(self, out_dir: str, is_main: bool):
        self.path = out_dir
        self.checkpoints = os.path.join(out_dir, CHECKPOINTS)
        self.metrics = os.path.join(out_dir, METRICS)
        self.loss_plot = os.path.join(out_dir, LOSS_PLOT)
        self._lock_handle = None
        self._created = not os.path.exists(out_dir)
        if is_main:
            self._create_and_lock()

    def _create_and_lock(self) -> None:
        try:
            os.makedirs(self.checkpoints, exist_ok=True)
            self._lock_handle = lock_folder(self.path, LOCK)
        except FolderBusy as busy:
            raise DataError(f"--out {self.path}: another training run (pid {busy.holder}) is writing there; "
                            f"wait for it to finish or choose another --out") from None
        except OSError as err:
            raise _cannot_write(self.path, err) from None
        for directory in (self.path, self.checkpoints):
            for entry in os.listdir(directory):
                if _TEMPORARY.match(entry):
                    path = os.path.join(directory, entry)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        remove_uncommitted_weights(self.checkpoints, below=sys.maxsize)

    def discard_if_unused(self) -> None:
        """Remove the folder again if this run created it and wrote nothing into it (a run that
        failed before its first step leaves no empty folder behind)."""
        if self._lock_handle is None or not self._created:
            return
        if os.listdir(self.checkpoints) or set(os.listdir(self.path)) - {ECSS_STORE} != {LOCK, CHECKPOINTS}:
            return
        shutil.rmtree(os.path.join(self.path, ECSS_STORE), ignore_errors=True)
        os.rmdir(self.checkpoints)
        os.unlink(os.path.join(self.path, LOCK))
        self._lock_handle.close()
        self._lock_handle = None
        os.rmdir(self.path)

    def remove_outputs(self, newer_than: Optional[int] = None) -> List[str]:
        """Delete run outputs (all, or only checkpoints of steps after ``newer_than``); returns them."""
        removed = []
        if newer_than is None:
            for name in (METRICS, LOSS_PLOT):
                path = os.path.join(self.path, name)
                if os.path.isfile(path):
                    os.unlink(path)
                    removed.append(path)
        if os.path.isdir(self.checkpoints):
            for entry in sorted(os.listdir(self.checkpoints)):
                step = file_step(entry)
                if step is not None and (newer_than is None or step > newer_than):
                    os.unlink(os.path.join(self.checkpoints, entry))
                    removed.append(os.path.join(self.checkpoints, entry))
        return removed

