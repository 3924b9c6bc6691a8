"""Saving a step: one file by rank 0 when every rank holds the whole model, else every rank's part
of a sharded step, committed by rank 0 once all are written (``checkpoint/sharded.py``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from mindspore import nn

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.context import ParallelInfo
from mindformers_sigma.parallel.strategy_file import strategy_document

NOT_CHECKPOINTED = ("learning_rate",)


def checkpointed_parameters(step_cell: nn.Cell) -> dict:
    """Everything a checkpoint holds; the LR schedule array is left out, as the config defines it."""
    return {name: param for name, param in step_cell.parameters_dict().items() if name not in NOT_CHECKPOINTED}


def is_split(config: SigmaConfig) -> bool:
    """Whether ranks hold different slices (else every rank holds the whole model and rank 0 saves it)."""
    p = config.parallel
    return p.model_parallel > 1 or p.expert_parallel > 1 or (p.optimizer_shard and p.data_parallel > 1)


def save_step(directory: str, step: int, parameters: dict, meta: dict, config: SigmaConfig,
              parallel: ParallelInfo) -> Optional[str]:
    """Save checkpoint ``step`` (every rank calls this at the same point); returns the committed path on rank 0."""
    fmt, keep = config.train.checkpoint_format, config.train.keep_checkpoints
    if not is_split(config):
        return ckpt.save_checkpoint(directory, step, parameters, meta, fmt, keep) if parallel.is_main else None
    ckpt.save_part(directory, step, parallel.rank, parameters, fmt)
    parallel.any_rank(False)  # a barrier: every part is on disk before the commit
    if not parallel.is_main:
        return None
    p = config.parallel
    layout = {"data_parallel": p.data_parallel, "model_parallel": p.model_parallel,
              "expert_parallel": p.expert_parallel, "vocab_parallel": p.vocab_parallel,
              "optimizer_shard": p.optimizer_shard}
    # the parts hold whole experts (ECSS's store, not the device slab): the strategy of the plain layout
    plain = dataclasses.replace(config, ecss=dataclasses.replace(config.ecss, enabled=False))
    return ckpt.commit_sharded(directory, step, meta, fmt, layout, strategy_document(plain, config.source), keep)
