"""Which device slab slot holds which expert in a step, and how many slots a step can need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.errors import DataError


def smallest_safe_slab(config: SigmaConfig) -> int:
    """The most experts one step can activate in a sparse layer: a step's rows (all micro-batches
    of this rank) span at most that many domains, and a domain's tokens only reach its own
    ``experts_per_domain`` experts."""
    rows = config.train.batch_size // config.parallel.data_parallel
    return min(config.moe.num_experts, min(rows, config.moe.num_domains) * config.moe.experts_per_domain)


def slab_size(config: SigmaConfig) -> int:
    """``ecss.slab_experts``, or the safe size when it is 0."""
    return config.ecss.slab_experts or smallest_safe_slab(config)


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


def assign_slots(plans: Sequence[np.ndarray], num_tokens: int, slab_experts: int,
                 layer_names: Sequence[str] = ()) -> SlabAssignment:
    """The slab layout of one step from its micro-batch plans (``num_tokens``: tokens per plan;
    ``layer_names`` name the sparse layers in errors).

    Every micro-batch of a step sees the same slab (their gradients are summed before the host
    update), so a layer's slab holds the union of its micro-batches' experts.
    """
    active = []
    for layer in range(plans[0].shape[0]):
        experts = [plan[layer, used_slots(plan[layer], num_tokens), 0] for plan in plans]
        union = np.unique(np.concatenate(experts)).astype(np.int32)
        if union.size > slab_experts:
            name = layer_names[layer] if layer < len(layer_names) else f"sparse layer {layer}"
            raise DataError(f"ecss: {name} needs {union.size} experts in one step but ecss.slab_experts is "
                            f"{slab_experts}; raise it, or set it to 0 for the safe size")
        active.append(union)
    return SlabAssignment(active)
