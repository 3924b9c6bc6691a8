"""The one place that talks to MindSpore's global context: device, mode, seed, parallel mode.

Model code never asks which device it runs on or how many there are; everything device- or
parallel-specific is decided here from the config.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional

import mindspore as ms
import numpy as np

from mindformers_sigma.config import ConfigError, SigmaConfig
from mindformers_sigma.distributed.collectives import create_groups
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.errors import UserError
from mindformers_sigma.native import layer_norm as native_layer_norm

_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@dataclass(frozen=True)
class ParallelInfo:
    """This process's place among the workers."""

    rank: int = 0
    group_size: int = 1
    topology: Topology = Topology()  # its coordinates in the data x model x expert mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: a collective, so every rank calls it at the same point
        of every step (the trainer uses it to stop all ranks after the same step)."""
        if self.group_size == 1:
            return flag
        return self.sum([float(flag)])[0] > 0

    def sum(self, values: List[float]) -> List[float]:
        """``values`` summed over every rank (a collective: every rank calls it at the same point), in float32:
        the one type MindSpore's CPU AllReduce sums outside a graph (a byte total is exact to 1 part in 1e7)."""
        if self.group_size == 1:
            return [float(v) for v in values]
        return [float(v) for v in _all_reduce_sum()(ms.Tensor(np.array(values, np.float32))).asnumpy()]


@functools.lru_cache(maxsize=1)
def _all_reduce_sum():
    """One AllReduce primitive for the per-step vote (sum: the only reduction mccl has on CPU)."""
    return ms.ops.AllReduce()


def device_id(device_target: str, environ=os.environ) -> Optional[int]:
    """The device this process must bind to, or None to leave the choice to MindSpore.

    Under msrun (``MS_ROLE`` set) msrun binds each rank itself.  Otherwise ``DEVICE_ID`` names the
    NPU/GPU: a rank-table launch sets it for every rank, and without it every rank would share
    device 0 (MindSpore's default outside msrun).  CPU has no device ids.
    """
    if device_target == "CPU" or "MS_ROLE" in environ:
        return None
    text = environ.get("DEVICE_ID")
    if text is None:
        if "RANK_TABLE_FILE" in environ:
            raise UserError("RANK_TABLE_FILE is set but DEVICE_ID is not: each rank of a rank-table launch needs its "
                            "device id (run/distributed_train.sh --rank-table sets both)")
        return None
    if not (text.isascii() and text.isdigit()) or int(text) > 4095:
        raise UserError(f"DEVICE_ID={text!r} is not a device id; set it to the device's index, e.g. 0..7")
    return int(text)


def _unusable_device(err: RuntimeError, config: SigmaConfig) -> ConfigError:
    first = (str(err).strip().splitlines() or [""])[0].split(". Please")[0]
    return ConfigError("context.device_target", config.context.device_target,
                       f"MindSpore cannot use it here ({first}); run where that device and its MindSpore are "
                       f"installed, or set context.device_target: CPU", config.source)


def configure_context(config: SigmaConfig) -> ParallelInfo:
    """Set device target, execution mode, parallel mode and seeds; returns this worker's rank."""
    ctx, parallel = config.context, config.parallel
    ms.set_context(mode=_MODES[ctx.mode])
    device = device_id(ctx.device_target)
    try:
        if device is None:
            ms.set_device(ctx.device_target)
        else:
            ms.set_device(ctx.device_target, device)
    except RuntimeError as err:  # e.g. an Ascend config on a machine whose MindSpore has only the CPU backend
        # the same device already running kernels (an earlier command in this process) is not an error
        if ms.get_context("device_target") != ctx.device_target or device is not None:
            raise _unusable_device(err, config) from None
    ms.set_seed(ctx.seed)  # the same on every rank: replicas start from identical weights
    native_layer_norm.ENABLED["native_kernels"] = ctx.native_kernels
    if parallel.mode == "stand_alone":
        return ParallelInfo()
    if "MS_WORKER_NUM" not in os.environ and "RANK_TABLE_FILE" not in os.environ:
        raise ConfigError("parallel.mode", parallel.mode,
                          "needs workers started by a launcher; run `bash run/distributed_train.sh` "
                          "(or set parallel.mode: stand_alone)", config.source)
    from mindspore.communication import get_group_size, get_rank, init

    init()
    group_size = get_group_size()
    if group_size != parallel.device_num:
        raise ConfigError("parallel.device_num", parallel.device_num,
                          f"but the launcher started {group_size} workers; make them agree", config.source)
    # MindSpore's own parallel context stays stand-alone: the model's layers call their collectives
    # themselves (distributed/collectives.py) and the train step sums the gradients by group.
    topology = Topology(parallel.data_parallel, parallel.model_parallel, parallel.expert_parallel, get_rank())
    create_groups(topology)
    return ParallelInfo(topology.rank, group_size, topology)
