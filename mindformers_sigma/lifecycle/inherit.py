"""Expert inheriting: a PanGu-Σ that starts from a dense PanGu-α of the same backbone.

Embeddings, attention, norms and the top query layer's attention are copied; in each sparse
layer every expert becomes a copy of that layer's dense FFN (optionally plus a little noise).
With no noise the sparse model computes exactly the dense function on every domain, as each
token meets a copy of the same FFN whichever expert RRE picks.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.model.pangu_sigma import build_routing_tables

BACKBONE_KEYS = ("vocab_size", "hidden_size", "num_heads", "ffn_hidden_size", "num_layers", "seq_length",
                 "eod_token_id", "layernorm_epsilon", "activation")


def check_same_backbone(dense: SigmaConfig, sigma: SigmaConfig, dense_source: str) -> None:
    for key in BACKBONE_KEYS:
        have, want = getattr(dense.model, key), getattr(sigma.model, key)
        if have != want:
            raise DataError(f"--dense {dense_source}: model.{key} is {have!r}, {sigma.source} has {want!r}; inherit "
                            f"needs the same backbone (only dense_layers/sparse_layers and moe may differ)")
    if dense.model.sparse_layers:
        raise DataError(f"--dense {dense_source}: has {dense.model.sparse_layers} sparse layers; inherit takes a "
                        f"dense model (model.sparse_layers 0)")
    if not sigma.moe.table_routed:
        raise DataError(f"{sigma.source}: moe.router = {sigma.moe.router!r}; inherit builds RRE models")
    if not sigma.model.sparse_layers:
        raise DataError(f"{sigma.source}: model.sparse_layers = 0; inherit builds a sparse model: give a PanGu-Σ "
                        f"config with sparse layers")


def _dense_tensor(dense: Dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
    if name not in dense:
        raise DataError(f"--dense {source}: lacks parameter {name}; is it a dense PanGu-α checkpoint of this backbone?")
    return dense[name]


def inherit_weights(dense: Dict[str, np.ndarray], dense_source: str, sigma: SigmaConfig, expected_shapes: Dict[str, tuple],
                    token_frequency: Optional[np.ndarray], noise_std: float, seed: int) -> Dict[str, np.ndarray]:
    """The sigma model's weights from the dense ones; ``expected_shapes`` are the built sigma model's."""
    experts = sigma.moe.num_experts
    rng = np.random.default_rng(seed)
    tables = build_routing_tables(sigma, token_frequency if sigma.moe.table_balance == "frequency" else None)
    sparse = names.sparse_layer_prefixes(sigma.model)
    table_layer = {names.routing_table_name(layer): index for index, layer in enumerate(sparse)}
    dense_twin = {expert: f"{layer}.{names.DENSE_FFN_OF_EXPERT[tensor]}" for layer in sparse
                  for tensor, expert in zip(names.EXPERT_TENSORS, names.expert_tensor_names(layer))}
    out: Dict[str, np.ndarray] = {}
    for name, shape in expected_shapes.items():
        if name in table_layer:
            value = tables[table_layer[name]]
        elif name in dense_twin:
            ffn = _dense_tensor(dense, dense_twin[name], dense_source).astype(np.float32)
            value = np.repeat(ffn.reshape((1,) + shape[1:]), experts, axis=0) if ffn.size == int(np.prod(shape[1:])) \
                else ffn
            if noise_std > 0 and not names.is_bias_or_norm(name):
                value = value + rng.normal(0.0, noise_std, value.shape).astype(np.float32)
        else:
            value = _dense_tensor(dense, name, dense_source)
        if tuple(value.shape) != tuple(shape):
            source = dense_twin.get(name, name)
            raise DataError(f"--dense {dense_source}: {source} has shape {tuple(dense[source].shape)}, {name} of "
                            f"{sigma.source} needs {tuple(shape)}; use a dense model of the same shapes")
        out[name] = value
    return out
