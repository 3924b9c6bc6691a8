"""Adding a domain: a new expert group and routing-table row, the old ones untouched.

The new group starts as a copy of one domain's experts or as the mean of all groups; its
row of each routing table is drawn from the seed, balanced on the new domain's token
frequencies when they are known.  Old domains' tokens route exactly as before to experts
whose weights are unchanged, so their logits are bit-identical until training changes the
shared layers (``train.freeze_shared`` keeps those, too).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import numpy as np

from mindformers_sigma.config import SigmaConfig, config_from_dict, config_to_dict
from mindformers_sigma.lifecycle.extract import standalone_sections
from mindformers_sigma.model import names
from mindformers_sigma.moe.routing_table import routing_table_row

DENSE_INIT = "dense"


def grown_config(config: SigmaConfig) -> SigmaConfig:
    """``config`` with one more domain (and its ``experts_per_domain`` experts), stand-alone."""
    raw = standalone_sections(copy.deepcopy(config_to_dict(config)))
    raw["moe"].update(num_domains=config.moe.num_domains + 1,
                      num_experts=config.moe.num_experts + config.moe.experts_per_domain)
    return config_from_dict(raw, source=f"{config.source} (+1 domain)")


def add_domain(config: SigmaConfig, weights: Dict[str, np.ndarray], init_from: Optional[int],
               frequency: Optional[np.ndarray], seed: int) -> Dict[str, np.ndarray]:
    """The weights with domain ``num_domains`` added; ``init_from``: a domain id whose experts the new
    group copies, None for the mean of all groups; ``frequency`` [vocab]: the new domain's token counts."""
    group, domains = config.moe.experts_per_domain, config.moe.num_domains
    out = dict(weights)
    for layer, prefix in enumerate(names.sparse_layer_prefixes(config.model)):
        table = names.routing_table_name(prefix)
        row = routing_table_row(config.model.vocab_size, group, seed, layer, domains, frequency)
        out[table] = np.concatenate([weights[table], row[None]], 0)
        for tensor in names.expert_tensor_names(prefix):
            experts = weights[tensor]
            if init_from is None:
                new = experts.reshape((domains, group) + experts.shape[1:]).mean(0, dtype=np.float64)
            else:
                new = experts[init_from * group:(init_from + 1) * group]
            out[tensor] = np.concatenate([experts, new.astype(experts.dtype)], 0)
    return out
