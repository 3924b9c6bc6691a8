"""The model's parameter names, for code that works on names without building the network.

Checkpoints, layouts, strategies, optimizer groups, ECSS's host store and the lifecycle
commands address parameters by name; the names are the Cells' attribute paths
(``PanGuSigmaForCausalLM.backbone.layers[2].ffn.experts.w1`` is ``backbone.layers.2.ffn.experts.w1``)
and this module spells them once.  ``tests/test_model.py`` builds models and checks every name
here against their parameters.  Imports no MindSpore: the planner and strategy files use it too.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from mindformers_sigma.config import ModelConfig

BACKBONE = "backbone"
WORD_EMBEDDING = "backbone.embedding.word.embedding_table"
POSITION_EMBEDDING = "backbone.embedding.position.embedding_table"
TOP_QUERY_EMBEDDING = "backbone.top_query_embedding.embedding_table"
FINAL_NORM = "backbone.final_norm"
LAYERS = "backbone.layers"
TOP_QUERY_LAYER = "backbone.top_query_layer"  # the last layer, outside ``backbone.layers``

# inside a layer (``<layer prefix>.<name>``)
ATTENTION = "attention"
ATTENTION_LINEARS = ("query", "key", "value", "output")
NORMS = ("attention_norm", "ffn_norm")
FFN = "ffn"  # a dense layer's FeedForward, or a sparse layer's MoELayer
DENSE_FFN_LINEARS = ("mapping", "projection")
EXPERTS = f"{FFN}.experts"
EXPERT_TENSORS = ("w1", "b1", "w2", "b2")  # BatchedExperts: [E, H, F], [E, 1, F], [E, F, H], [E, 1, H]
# each expert tensor's twin in a dense layer (expert inheriting copies one into the other)
DENSE_FFN_OF_EXPERT = {"w1": "ffn.mapping.weight", "b1": "ffn.mapping.bias",
                       "w2": "ffn.projection.weight", "b2": "ffn.projection.bias"}
ROUTING_TABLE = f"{FFN}.router.routing_table"  # RRE: int32 [domains, vocab], not trainable
GATE_WEIGHT = f"{FFN}.router.weight"  # a learned router's gate [H, E]

MOMENTS = ("adam_m", "adam_v")  # AdamW's moments of parameter P are named adam_m.P and adam_v.P


def layer_prefix(index: int, num_layers: int) -> str:
    """The name prefix of layer ``index`` (0 = bottom) of a ``num_layers``-layer model."""
    return TOP_QUERY_LAYER if index == num_layers - 1 else f"{LAYERS}.{index}"


def layer_prefixes(model: ModelConfig) -> List[str]:
    """Every layer's prefix, bottom to top."""
    return [layer_prefix(index, model.num_layers) for index in range(model.num_layers)]


def sparse_layer_prefixes(model: ModelConfig) -> List[str]:
    """The sparse layers' prefixes, bottom to top (the top query layer is the last)."""
    return layer_prefixes(model)[model.dense_layers:]


def expert_prefix(layer: str) -> str:
    """Where a sparse layer's expert tensors are: ``<layer>.ffn.experts``."""
    return f"{layer}.{EXPERTS}"


def expert_tensor_names(layer: str) -> Tuple[str, ...]:
    """The four expert tensors of a sparse layer, in ``EXPERT_TENSORS`` order."""
    return tuple(f"{expert_prefix(layer)}.{tensor}" for tensor in EXPERT_TENSORS)


def routing_table_name(layer: str) -> str:
    return f"{layer}.{ROUTING_TABLE}"


def moment_names(name: str) -> Tuple[str, str]:
    """The names of both AdamW moments of parameter ``name``."""
    return f"{MOMENTS[0]}.{name}", f"{MOMENTS[1]}.{name}"


def is_moment(name: str) -> bool:
    """An AdamW moment (``adam_m.P`` or ``adam_v.P``)."""
    return name.startswith(tuple(f"{moment}." for moment in MOMENTS))


def is_expert_parameter(name: str) -> bool:
    """An expert tensor, or an optimizer state of one (``adam_m.<expert tensor>``)."""
    return f".{EXPERTS}." in name


def is_bias_or_norm(name: str) -> bool:
    """A bias (dense or expert) or a LayerNorm gain or shift: the parameters AdamW does not decay."""
    return name.rsplit(".", 1)[-1] in ("gamma", "beta", "bias", "b1", "b2")


def is_model_parameter(name: str) -> bool:
    """The network's own weights and routing tables (the rest of a train step is optimizer and scale state)."""
    return name.startswith(BACKBONE + ".")


_LAYER = re.compile(rf"^(.*?(?:{re.escape(LAYERS)}\.\d+|{re.escape(TOP_QUERY_LAYER)}))\.")


# How model and expert parallelism cut each tensor, one entry per dimension: "model" (over model_parallel),
# "expert" (over expert_parallel) or None (whole).  Column-parallel linears split their output features,
# row-parallel ones their input features; every other parameter is whole on every rank.
_LINEAR_SPLITS = {"query": (None, "model"), "key": (None, "model"), "value": (None, "model"), "mapping": (None, "model"),
                  "output": ("model", None), "projection": ("model", None)}
_EXPERT_SPLITS = {"w1": ("expert", None, "model"), "b1": ("expert", None, "model"), "w2": ("expert", "model", None),
                  "b2": ("expert", None, None)}


def split_axes(name: str, ndim: int, vocab_parallel: bool) -> Tuple[Optional[str], ...]:
    """Per dimension of parameter ``name`` (or of its optimizer moment): which parallel axis splits it."""
    base = name.split(".", 1)[1] if is_moment(name) else name
    owner, _, tensor = base.rpartition(".")
    if is_expert_parameter(base):
        return _EXPERT_SPLITS[tensor]
    role = owner.rsplit(".", 1)[-1]
    if role in _LINEAR_SPLITS and f".{ATTENTION}.{role}" in base or role in DENSE_FFN_LINEARS and f".{FFN}.{role}" in base:
        weight_splits = _LINEAR_SPLITS[role]
        return weight_splits if tensor == "weight" else weight_splits[1:]
    if base == WORD_EMBEDDING and vocab_parallel:
        return ("model",) + (None,) * (ndim - 1)
    return (None,) * ndim


def layer_of(name: str) -> str:
    """The layer prefix of a parameter (``backbone.layers.3.attention.query.weight`` -> ``backbone.layers.3``,
    an optimizer state's with its own prefix); the name itself for parameters outside the layers."""
    match = _LAYER.match(name)
    return match.group(1) if match else name
