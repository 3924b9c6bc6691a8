"""Official PanGu-α tensors <-> this project's dense PanGu-α: names, orientation, shapes and config.

The shapes (layers, hidden, FFN, vocabulary, sequence length) are read from the tensors; the head count
is not stored in any tensor, so it comes from the user (``--num-heads`` or a preset).  Every tensor is
checked against the shape the derived config's model has, so an unknown name, a missing tensor or a
contradiction is one line naming the tensor before anything is written.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import numpy as np

from mindformers_sigma.config import SigmaConfig, config_from_dict
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.pangu_alpha.namings import (BLOCK, NAMINGS, TOP_QUERY_LAYER, Naming, name_map,
                                                   official_layer_prefix)

# the released sizes: (layers, hidden, heads)
PRESETS = {"2.6b": (32, 2560, 32), "13b": (40, 5120, 40)}
DOMAIN = "general"  # a dense model's one domain
_BLOCK_INDEX = re.compile(r"^backbone\.blocks\.(\d+)\.")


def detect_naming(weights: Dict[str, np.ndarray], source: str) -> Naming:
    """The release whose table names the checkpoint uses (PCL's when it holds none: its tables ship as .npy)."""
    for role in ("word", "position", "top_query"):  # the word table tells them all apart; two share a top-query name
        for naming in NAMINGS.values():
            if getattr(naming, role) in weights:
                return naming
    if any(_BLOCK_INDEX.match(name) or name.startswith(TOP_QUERY_LAYER + ".") for name in weights):
        return NAMINGS["pcl"]
    raise DataError(f"{source}: holds no PanGu-α tensor (no backbone.blocks.N.*, no word embedding table such as "
                    f"{NAMINGS['pcl'].word} or {NAMINGS['mindformers'].word}); is it a PanGu-α checkpoint?")


def _require_tensor(weights: Dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
    if name not in weights:
        raise DataError(f"{source}: missing tensor {name}; is the release complete?")
    return weights[name]


def _matrix(weights: Dict[str, np.ndarray], name: str, source: str, what: str) -> Tuple[int, int]:
    """The shape of a 2-D tensor the config's sizes are read from; anything else is one line."""
    shape = tuple(_require_tensor(weights, name, source).shape)
    if len(shape) != 2 or 0 in shape:
        raise DataError(f"{source}: {name} has shape {shape}, expected {what}; is the release damaged?")
    return shape


def count_layers(weights: Dict[str, np.ndarray], source: str) -> int:
    """Layers = the blocks below the top query layer, plus it (a pipeline-stage release is refused)."""
    blocks = {int(match.group(1)) for match in map(_BLOCK_INDEX.match, weights) if match}
    if not any(name.startswith(TOP_QUERY_LAYER + ".") for name in weights):
        last = BLOCK.format(index=max(blocks)) if blocks else "backbone.blocks.N"
        raise DataError(f"{source}: missing tensor {TOP_QUERY_LAYER}.layernorm1.gamma; a release saved with pipeline "
                        f"stages keeps the query layer as {last} with the final LayerNorm after it, which this "
                        f"project's model does not compute (it imports the stage_num 1 layout)")
    return (max(blocks) + 1 if blocks else 0) + 1


def imported_config(weights: Dict[str, np.ndarray], naming: Naming, num_layers: int, num_heads: int,
                    activation: str, eod_token_id: int, source: str) -> SigmaConfig:
    """The dense PanGu-α config whose shapes the tensors have."""
    vocab_size, hidden_size = _matrix(weights, naming.word, source, "[vocabulary, hidden]")
    seq_length = _matrix(weights, naming.position, source, "[sequence, hidden]")[0]
    ffn_hidden_size = _matrix(weights, f"{official_layer_prefix(0, num_layers)}.output.mapping.weight", source,
                              "[hidden, FFN]")[1]
    if hidden_size % num_heads:
        raise DataError(f"--num-heads {num_heads}: the hidden size {hidden_size} (from {naming.word}) is not a "
                        f"multiple of it; give the release's head count (2.6B: 32, 13B: 40)")
    model = {"vocab_size": int(vocab_size), "hidden_size": int(hidden_size), "num_heads": num_heads,
             "ffn_hidden_size": int(ffn_hidden_size), "num_layers": num_layers, "dense_layers": num_layers,
             "sparse_layers": 0, "seq_length": int(seq_length), "eod_token_id": eod_token_id,
             "layernorm_epsilon": 1e-5, "dropout_rate": 0.0, "activation": activation}
    moe = {"router": "rre", "num_experts": 1, "num_domains": 1, "experts_per_domain": 1}
    return config_from_dict({"model": model, "moe": moe}, source=f"{source} (imported)")


def _our_shapes(config: SigmaConfig) -> Dict[str, Tuple[int, ...]]:
    from mindformers_sigma.parallel.layouts import parameter_layouts

    return {layout.name: layout.shape for layout in parameter_layouts(config) if names.is_model_parameter(layout.name)}


def to_project(weights: Dict[str, np.ndarray], naming: Naming, config: SigmaConfig,
               source: str) -> Dict[str, np.ndarray]:
    """This project's weights from the official ones; every official weight must be used and fit."""
    mapping = name_map(naming, config.model.num_layers)
    unknown = next((name for name in sorted(weights) if name not in mapping), None)
    if unknown is not None:
        raise DataError(f"{source}: unknown tensor {unknown}; not a weight of a {config.model.num_layers}-layer "
                        f"PanGu-α in the {naming.name} naming (is it another model's checkpoint?)")
    shapes = _our_shapes(config)
    ours = {}
    for official, (name, transposed) in mapping.items():
        value = _require_tensor(weights, official, source)
        want = shapes[name][::-1] if transposed else shapes[name]
        if tuple(value.shape) != tuple(want):
            raise DataError(f"{source}: {official} has shape {tuple(value.shape)}, expected {tuple(want)} for hidden "
                            f"{config.model.hidden_size}, FFN {config.model.ffn_hidden_size}, vocabulary "
                            f"{config.model.vocab_size}, sequence {config.model.seq_length}; the tensors contradict "
                            f"each other (a damaged or mixed release, or a strategy file that does not describe it?)")
        if not np.isfinite(value).all():
            raise DataError(f"{source}: {official} holds NaN or infinite values; the release is damaged (download it "
                            f"again)")
        ours[name] = np.ascontiguousarray(value.T) if transposed else value
    return ours


def from_project(weights: Dict[str, np.ndarray], naming: Naming, num_layers: int) -> Dict[str, np.ndarray]:
    """The official names and orientations of a dense model's weights (the inverse of :func:`to_project`)."""
    return {official: np.ascontiguousarray(weights[name].T) if transposed else weights[name]
            for official, (name, transposed) in name_map(naming, num_layers).items()}


def check_preset(preset: str, num_layers: int, weights: Dict[str, np.ndarray], naming: Naming, source: str) -> int:
    """The preset's head count, once its layers and hidden size are the checkpoint's."""
    layers, hidden, heads = PRESETS[preset]
    hidden_size = _matrix(weights, naming.word, source, "[vocabulary, hidden]")[1]
    if (layers, hidden) != (num_layers, hidden_size):
        fits = [name for name, (other_layers, other_hidden, _) in PRESETS.items()
                if (other_layers, other_hidden) == (num_layers, hidden_size)]
        raise DataError(f"--preset {preset}: {layers} layers, hidden {hidden}; {source} has {num_layers} layers, "
                        f"hidden {hidden_size}" + (f" (--preset {fits[0]})" if fits else "; give --num-heads instead"))
    return heads
