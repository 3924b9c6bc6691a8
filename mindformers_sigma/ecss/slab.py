"""Which device slab slot holds which expert, for which micro-batches of a step, and how big a
slab must be.

A step's micro-batches (this rank's, and with data parallelism every rank's, since their slab
gradients are all-reduced slot by slot) share one slab load while their experts fit in it
together; when they do not, the step is cut into consecutive groups of micro-batches that do,
and the slab is reloaded between groups (their gradients are summed on the host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.errors import DataError


def slab_for_rows(config: SigmaConfig, rows: int) -> int:
    """The most experts of one rank ``rows`` samples can activate in one sparse layer: they span at most
    that many domains, a domain's tokens only reach its own ``experts_per_domain`` experts, and a rank
    holds ``num_experts / expert_parallel`` experts."""
    held = config.moe.num_experts // config.parallel.expert_parallel
    return min(held, min(rows, config.moe.num_domains) * config.moe.experts_per_domain)


def smallest_safe_slab(config: SigmaConfig) -> int:
    """The fewest slots that no batch can overflow: one micro-batch index of every rank
    (``train.batch_size / grad_accumulation_steps`` samples) must fit in one load."""
    return slab_for_rows(config, config.train.batch_size // config.train.grad_accumulation_steps)


def whole_step_slab(config: SigmaConfig) -> int:
    """The slots with which no step ever reloads the slab: the whole global batch in one load."""
    return slab_for_rows(config, config.train.batch_size)


def slab_size(config: SigmaConfig) -> int:
    """``ecss.slab_experts``, or the whole-step size when it is 0."""
    return config.ecss.slab_experts or whole_step_slab(config)


def used_slots(layer_plan: np.ndarray, num_tokens: int) -> np.ndarray:
    """Which slots of a ``[K, C + 1]`` plan hold a token (an empty row holds ``num_tokens``)."""
    return np.any(layer_plan[:, 1:] < num_tokens, axis=1)


@dataclass
class SlabAssignment:
    """Per sparse layer, the experts loaded into slots ``0 .. n-1``, in expert order."""

    active: List[np.ndarray]

    def remap(self, plan: np.ndarray, num_tokens: int) -> np.ndarray:
        """A step's ``[L, K, C + 1]`` plan with experts replaced by their slots (padding slots: slot 0)."""
        remapped = plan.copy()
        for layer, experts in enumerate(self.active):
            used = used_slots(plan[layer], num_tokens)
            remapped[layer, :, 0] = 0
            remapped[layer, used, 0] = np.searchsorted(experts, plan[layer, used, 0])
        return remapped


@dataclass
class SlabLoad:
    """One load of the slab: micro-batches ``first .. last`` (inclusive) run with ``assignment``."""

    first: int
    last: int
    assignment: SlabAssignment


def plan_slab_loads(micro_experts: Sequence[Sequence[np.ndarray]], slab_experts: int,
                    layer_names: Sequence[str] = ()) -> List[SlabLoad]:
    """The fewest slab loads for a step: ``micro_experts[m][l]`` are the experts micro-batch index
    ``m`` activates in sparse layer ``l`` on any rank.  Consecutive micro-batches share a load
    while every layer's union fits in ``slab_experts`` (greedy, which is optimal for consecutive
    groups since a union only grows).  A micro-batch that alone overflows a layer is one error line.
    """
    loads: List[SlabLoad] = []
    union: List[np.ndarray] = []
    for micro, experts in enumerate(micro_experts):
        for layer, layer_experts in enumerate(experts):
            if layer_experts.size > slab_experts:
                name = layer_names[layer] if layer < len(layer_names) else f"sparse layer {layer}"
                raise DataError(f"ecss: {name} needs {layer_experts.size} experts in one micro-batch but "
                                f"ecss.slab_experts is {slab_experts}; raise it, set it to 0 for the whole-step "
                                f"size, or raise train.grad_accumulation_steps")
        merged = [np.union1d(a, b) for a, b in zip(union, experts)] if loads else []
        if loads and all(m.size <= slab_experts for m in merged):
            union = merged
            loads[-1].last = micro
        else:
            union = [np.unique(e) for e in experts]
            loads.append(SlabLoad(micro, micro, SlabAssignment(union)))
        loads[-1].assignment = SlabAssignment([u.astype(np.int32) for u in union])
    return loads
