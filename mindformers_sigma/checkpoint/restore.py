"""A train step's state restored from a checkpoint: weights, routing tables, AdamW moments, loss scale,
and ECSS's host arrays."""

from __future__ import annotations

from typing import Dict, Optional

import mindspore as ms
import numpy as np

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names


def restore(step_cell: ms.nn.Cell, info: ckpt.CheckpointInfo, not_checkpointed: tuple,
            host_arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Load every checkpointed parameter of ``step_cell`` (weights, routing tables, moments, scale).

    ``host_arrays`` (ECSS: the host store and routing tables) are filled from the checkpoint's
    entries of the same names, tensor by tensor; the others go into the cell.
    """
    host = host_arrays or {}
    wanted = {name for name in step_cell.parameters_dict() if name not in not_checkpointed and name not in host}
    if info.meta.get(ckpt.WEIGHTS_ONLY) is True:  # the model alone: optimizer state and loss scale start fresh
        host = {name: array for name, array in host.items() if names.is_model_parameter(name)}
        wanted = {name for name in wanted if names.is_model_parameter(name)}
    stored = ckpt.load_parameters(info, skip=set(not_checkpointed) | set(host))
    if host:
        ckpt.copy_into(info, host, f"--resume {info.weights_path}")
    try:
        missing, _ = ms.load_param_into_net(step_cell, stored, strict_load=True)
    except (RuntimeError, ValueError, TypeError) as err:
        raise DataError(f"--resume {info.weights_path}: does not fit this model "
                        f"({str(err).splitlines()[0][:200]}); was it written with another config?") from None
    missing = [name for name in missing if name in wanted]
    if missing and all(names.is_moment(name) and not names.is_expert_parameter(name) for name in missing):
        raise DataError(f"--resume {info.weights_path}: holds AdamW moments for the experts only (trained with "
                        f"train.freeze_shared); continue with --set train.freeze_shared=true")
    if missing:
        raise DataError(f"--resume {info.weights_path}: lacks {len(missing)} parameters of this model "
                        f"(first: {missing[0]}); was it written with another config?")
