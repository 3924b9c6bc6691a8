"""A train step's state restored from a checkpoint: weights, routing tables, AdamW moments, loss scale,
and ECSS's host arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import mindspore as ms
import numpy as np

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.checkpoint import sharded
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.model.initial_values import piece_of


@dataclass(frozen=True)
class Placement:
    """Which slice of each whole tensor the restoring rank holds (one process: all of it)."""

    topology: Topology = Topology()
    vocab_parallel: bool = False

    def local(self, name: str, value: ms.Parameter, held: Optional[tuple]) -> ms.Parameter:
        """The piece of whole tensor ``value`` this rank holds (``held``: its shape here, None if not held)."""
        if self.topology.world_size == 1 or held is None:
            return value
        part = piece_of(name, tuple(value.shape), held, self.topology, self.vocab_parallel)
        return ms.Parameter(ms.Tensor(np.ascontiguousarray(value.asnumpy()[part])), name=name)


def _own_part(info: ckpt.CheckpointInfo, placement: Placement, shapes: Dict[str, tuple],
              host: Dict[str, np.ndarray]) -> Optional[Dict[str, np.ndarray]]:
    """This rank's part of a sharded step written by the same layout, when its tensors have this rank's shapes
    (else None: the step is merged and cut, as for any other layout)."""
    if not ckpt.is_sharded(info):
        return None
    written = sharded.layout_of(info.meta)
    topology = placement.topology
    if (written.data_parallel, written.model_parallel, written.expert_parallel) != \
            (topology.data_parallel, topology.model_parallel, topology.expert_parallel):
        return None
    part = ckpt.read_part(info, topology.rank)
    held = dict(shapes, **{name: array.shape for name, array in host.items()})
    return part if all(tuple(array.shape) == tuple(held.get(name, array.shape)) for name, array in part.items()) \
        else None


def restore(step_cell: ms.nn.Cell, info: ckpt.CheckpointInfo, not_checkpointed: tuple,
            host_arrays: Optional[Dict[str, np.ndarray]] = None, placement: Placement = Placement()) -> None:
    """Load every checkpointed parameter of ``step_cell`` (weights, routing tables, moments, scale).

    ``host_arrays`` (ECSS: the host store and routing tables) are filled from the checkpoint's
    entries of the same names, tensor by tensor; the others go into the cell, each cut to the slice
    ``placement`` names (the checkpoint holds whole tensors, or is merged from a sharded step), so a
    run resumes onto any layout.
    """
    host = host_arrays or {}
    wanted = {name for name in step_cell.parameters_dict() if name not in not_checkpointed and name not in host}
    if info.meta.get(ckpt.WEIGHTS_ONLY) is True:  # the model alone: optimizer state and loss scale start fresh
        host = {name: array for name, array in host.items() if names.is_model_parameter(name)}
        wanted = {name for name in wanted if names.is_model_parameter(name)}
    shapes = {name: tuple(param.shape) for name, param in step_cell.parameters_dict().items()}
    skip = set(not_checkpointed) | set(host)
    own = _own_part(info, placement, shapes, host)
    if own is not None:  # the same layout: this rank's part is its slices, read alone
        stored = {name: ms.Parameter(ms.Tensor(array), name=name) for name, array in own.items() if name not in skip}
    else:
        stored = {name: placement.local(name, value, shapes.get(name))
                  for name, value in ckpt.load_parameters(info, skip=skip).items()}
    if host and own is not None:
        ckpt.copy_into(info, host, f"--resume {info.weights_path}", {name: own[name] for name in host if name in own})
    elif host and placement.topology.world_size > 1:  # this rank's experts' slices of the whole store
        whole = ckpt.read_tensors(info, lambda name: name in host)
        ckpt.copy_into(info, host, f"--resume {info.weights_path}",
                       {name: placement.local(name, ms.Parameter(ms.Tensor(array), name=name), host[name].shape)
                        .asnumpy() for name, array in whole.items()})
    elif host:
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
