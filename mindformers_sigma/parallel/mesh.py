"""The device mesh of a config: data x model parallel inside each of ``pipeline_stage`` stages.

Ranks are numbered stage by stage, and inside a stage row-major over ``[dp, mp]`` (model
parallel fastest), as MindSpore numbers a device matrix: ranks ``0..mp-1`` of a stage share one
data shard, so model-parallel groups stay inside a server of 8.  Expert parallel splits the
data-parallel axis: ``[dp/ep, ep, mp]``, so an expert's ``ep`` owners are ``mp`` ranks apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from mindformers_sigma.config import SigmaConfig


@dataclass(frozen=True)
class DeviceMesh:
    data_parallel: int
    model_parallel: int
    pipeline_stages: int
    expert_parallel: int
    micro_batches: int
    num_layers: int

    @classmethod
    def of(cls, config: SigmaConfig) -> "DeviceMesh":
        p = config.parallel
        return cls(p.data_parallel, p.model_parallel, p.pipeline_stage, p.expert_parallel, p.micro_batch_num,
                   config.model.num_layers)

    @property
    def stage_devices(self) -> int:
        return self.data_parallel * self.model_parallel

    @property
    def devices(self) -> int:
        return self.stage_devices * self.pipeline_stages

    @property
    def dense_matrix(self) -> List[int]:
        return [self.data_parallel, self.model_parallel]

    @property
    def expert_matrix(self) -> List[int]:
        return [self.data_parallel // self.expert_parallel, self.expert_parallel, self.model_parallel]

    def stage_of_layer(self, layer: int) -> int:
        """Contiguous stages; the first ``num_layers % stages`` stages take one layer more."""
        base, extra = divmod(self.num_layers, self.pipeline_stages)
        boundary = extra * (base + 1)
        if layer < boundary:
            return layer // (base + 1)
        return extra + (layer - boundary) // base

    def layers_of_stage(self, stage: int) -> List[int]:
        return [layer for layer in range(self.num_layers) if self.stage_of_layer(layer) == stage]

    @property
    def last_stage(self) -> int:
        return self.pipeline_stages - 1


def micro_batch_rows(config: SigmaConfig) -> int:
    """Samples one data-parallel rank computes per micro-batch."""
    p = config.parallel
    return config.train.batch_size // (p.data_parallel * p.micro_batch_num * config.train.grad_accumulation_steps)
