"""One domain's sub-model: the shared layers and that domain's expert group, nothing else.

RRE sends a domain-d token only to the experts of group d, so cutting the other groups out
(and renumbering the routing-table row to the group) leaves every domain-d computation as it
was: the sub-model's logits on domain-d inputs are the full model's.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import numpy as np

from mindformers_sigma.config import SigmaConfig, config_from_dict, config_to_dict
from mindformers_sigma.model import names


def standalone_sections(raw: dict) -> dict:
    """``raw`` with a one-device layout and ECSS's slab reset, so a config derived for another expert
    count is valid (the original layout's expert_parallel or slab need not divide it)."""
    raw["parallel"] = {"mode": "stand_alone", "device_num": 1}
    raw.setdefault("ecss", {})["slab_experts"] = 0
    return raw


def submodel_config(config: SigmaConfig) -> SigmaConfig:
    """``config`` with one domain of ``experts_per_domain`` experts, stand-alone."""
    raw = standalone_sections(copy.deepcopy(config_to_dict(config)))
    raw["moe"].update(num_domains=1, num_experts=config.moe.experts_per_domain)
    return config_from_dict(raw, source=f"{config.source} (one-domain sub-model)")


def extract_domain(config: SigmaConfig, weights: Dict[str, np.ndarray], domain: int
                   ) -> Tuple[SigmaConfig, Dict[str, np.ndarray]]:
    """The sub-model config and weights of domain id ``domain``."""
    group = config.moe.experts_per_domain
    first = domain * group
    out = dict(weights)
    for layer in names.sparse_layer_prefixes(config.model):
        table = names.routing_table_name(layer)
        out[table] = (weights[table][domain:domain + 1] - first).astype(np.int32)
        for tensor in names.expert_tensor_names(layer):
            out[tensor] = np.ascontiguousarray(weights[tensor][first:first + group])
    return submodel_config(config), out
