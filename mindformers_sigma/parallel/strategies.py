"""Op-level shard strategies of the layout (for the strategy file), and recompute on a built network.

The strategies describe, in MindSpore's terms, how the layers split themselves
(``distributed/``), with the same rules as the parameter layouts (``layouts.LINEAR_ROLES``); the
strategy file records them beside the parameter layouts that ``transform_checkpoints`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Tuple

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.model import names
from mindformers_sigma.parallel.layouts import COLUMN, LINEAR_ROLES
from mindformers_sigma.parallel.mesh import DeviceMesh

if TYPE_CHECKING:  # the strategies themselves need no MindSpore: plan and strategy files run without it
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


def apply_layout(config: SigmaConfig, network: PanGuSigmaForCausalLM) -> None:
    """Per-layer recompute: keep only layer inputs, recompute activations in the backward pass.  (The op
    strategies above describe the layout in the strategy file; the layers split themselves.)"""
    if not config.parallel.recompute:
        return
    backbone = network.backbone
    for layer in (*backbone.layers, backbone.top_query_layer):
        layer.recompute()
