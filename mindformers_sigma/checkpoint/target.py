"""Where a command writes a weights-only checkpoint (``--out NAME.ckpt``), checked before any work."""

from __future__ import annotations

import os
import re

from mindformers_sigma.atomic import remove_stale_temporaries
from mindformers_sigma.errors import UserError


def checkpoint_target(path: str) -> str:
    """--out for a checkpoint: NAME.ckpt or NAME.safetensors in an existing folder, not yet taken."""
    from mindformers_sigma.checkpoint.files import file_step

    if not path.endswith((".ckpt", ".safetensors")):
        raise UserError(f"--out {path}: name the checkpoint file to write, ending in .ckpt or .safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--out {path}: its folder {folder} does not exist; create it first")
    sidecar = os.path.splitext(path)[0] + ".json"
    if os.path.exists(sidecar):
        raise UserError(f"--out {path}: {sidecar} exists; choose a new name (nothing is overwritten)")
    if os.path.isdir(path):
        raise UserError(f"--out {path}: is a folder; name the checkpoint file to write")
    if file_step(os.path.basename(path)) is not None:
        raise UserError(f"--out {path}: step_N names belong to a training run's checkpoints (--resume auto would take "
                        f"this weights-only file for step N); choose another name")
    if os.path.lexists(path):  # without a sidecar: another tool's checkpoint, or what a killed write left
        raise UserError(f"--out {path}: exists (without a sidecar {os.path.basename(sidecar)}); choose a new name, "
                        f"or remove it if it is a killed write's leftover (nothing is overwritten)")
    remove_stale_temporaries(folder, re.escape(os.path.basename(path)) + "|" + re.escape(os.path.basename(sidecar)))
    return path
