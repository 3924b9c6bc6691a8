"""The layout applied to a built network: op-level shard strategies, pipeline stages, recompute.

The model code holds primitives and no numbers; this module sets every strategy from the
parallel config, with the same split rules as the parameter layouts (``layouts.LINEAR_ROLES``).
Strategies take effect under ``semi_auto_parallel`` (Ascend/GPU); stand-alone and data-parallel
runs get only the recompute marks, so a CPU graph is the one the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Tuple

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.model import names
from mindformers_sigma.parallel.layouts import COLUMN, LINEAR_ROLES
from mindformers_sigma.parallel.mesh import DeviceMesh

if TYPE_CHECKING:  # the strategies themselves need no MindSpore: plan and strategy files run without it
    from mindspore import nn

    from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM

Strategy = Tuple[Tuple[int, ...], ...]


@dataclass(frozen=True)
class OpStrategy:
    stage: int
    in_strategy: Strategy


def _layer_ops(config: SigmaConfig, mesh: DeviceMesh, prefix: str, layer: int, found: Dict[str, OpStrategy]) -> None:
    dp, mp, ep = mesh.data_parallel, mesh.model_parallel, mesh.expert_parallel
    stage = mesh.stage_of_layer(layer)
    linears = [f"{names.ATTENTION}.{role}" for role in names.ATTENTION_LINEARS]
    if layer < config.model.dense_layers:
        linears += [f"{names.FFN}.{role}" for role in names.DENSE_FFN_LINEARS]
    for path in linears:
        if LINEAR_ROLES[path.rsplit(".", 1)[-1]] == COLUMN:  # [N, in] x [in, out/mp]
            found[f"{prefix}.{path}/matmul"] = OpStrategy(stage, ((dp, 1), (1, mp)))
            found[f"{prefix}.{path}/add_bias"] = OpStrategy(stage, ((dp, mp), (mp,)))
        else:  # [N, in/mp] x [in/mp, out]: partial sums all-reduced over mp
            found[f"{prefix}.{path}/matmul"] = OpStrategy(stage, ((dp, mp), (mp, 1)))
            found[f"{prefix}.{path}/add_bias"] = OpStrategy(stage, ((dp, 1), (1,)))
    heads = ((dp, mp, 1, 1), (dp, mp, 1, 1))  # attention split by heads
    found[f"{prefix}.{names.ATTENTION}/scores"] = OpStrategy(stage, heads)
    found[f"{prefix}.{names.ATTENTION}/softmax"] = OpStrategy(stage, heads[:1])
    found[f"{prefix}.{names.ATTENTION}/mix"] = OpStrategy(stage, heads)
    if layer >= config.model.dense_layers:
        # Slots over ep: redistributing token rows (split over dp) to expert slots (split over ep)
        # is the expert all-to-all; F over mp inside each expert.
        found[f"{names.expert_prefix(prefix)}/up"] = OpStrategy(stage, ((ep, 1, 1), (ep, 1, mp)))
        found[f"{names.expert_prefix(prefix)}/down"] = OpStrategy(stage, ((ep, 1, mp), (ep, mp, 1)))


def _cell_of(parameter: str) -> str:
    """The path of the cell that holds ``parameter``."""
    return parameter.rsplit(".", 1)[0]


def op_strategies(config: SigmaConfig) -> Dict[str, OpStrategy]:
    """``"cell path/primitive attribute" -> (stage, in_strategy)`` for every sharded primitive, from the config alone."""
    mesh = DeviceMesh.of(config)
    dp, mp = mesh.data_parallel, mesh.model_parallel
    vocab = mp if config.parallel.vocab_parallel else 1
    last = mesh.last_stage
    found: Dict[str, OpStrategy] = {
        f"{_cell_of(names.WORD_EMBEDDING)}/gather": OpStrategy(0, ((vocab, 1), (dp, 1))),
        f"{_cell_of(names.POSITION_EMBEDDING)}/gather": OpStrategy(0, ((1, 1), (dp, 1))),
    }
    for layer, prefix in enumerate(names.layer_prefixes(config.model)):
        _layer_ops(config, mesh, prefix, layer, found)
    found[f"{_cell_of(names.TOP_QUERY_EMBEDDING)}/gather"] = OpStrategy(last, ((1, 1), (dp, 1)))
    found["head"] = OpStrategy(last, ((dp, 1), (vocab, 1)))  # hidden [N, H] x word table [V, H] (transpose_b)
    return found


def _primitive(network: nn.Cell, key: str):
    path, attribute = key.rsplit("/", 1) if "/" in key else ("", key)
    cell = network
    for part in filter(None, path.split(".")):
        cell = getattr(cell, part) if not part.isdigit() else cell[int(part)]
    return getattr(cell, attribute)


def apply_layout(config: SigmaConfig, network: PanGuSigmaForCausalLM) -> None:
    """Shard strategies and pipeline stages (semi_auto_parallel only) and per-layer recompute."""
    backbone = network.backbone
    layers = (*backbone.layers, backbone.top_query_layer)
    if config.parallel.recompute:  # keep only layer inputs; recompute activations in the backward pass
        for layer in layers:
            layer.recompute()
    if config.parallel.mode != "semi_auto_parallel":
        return
    for key, op in op_strategies(config).items():
        _primitive(network, key).shard(op.in_strategy)
    mesh = DeviceMesh.of(config)
    if mesh.pipeline_stages > 1:
        backbone.embedding.pipeline_stage = 0
        for index, layer in enumerate(layers):
            layer.pipeline_stage = mesh.stage_of_layer(index)
        for tail in (backbone.final_norm, backbone.top_query_embedding):
            tail.pipeline_stage = mesh.last_stage
