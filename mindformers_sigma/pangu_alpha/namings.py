"""How the official MindSpore PanGu-α releases name and orient their tensors, against this project's names.

Every release (stage_num 1 layout) has the same decoder: ``L - 1`` pre-LayerNorm blocks, the final
LayerNorm, then the top query layer, and the word table tied to the head; they differ in where the
three tables live.  Read from each release's model code:

* ``pcl``: PCL's ``panguAlpha_mindspore/src/pangu_alpha.py`` (the ``pcl-pangu`` package; the same file as
  MindSpore's v1.3 ``model_zoo/official/nlp/pangu_alpha``): a top-level ``embedding_table``,
  ``backbone.top_query_embedding_table`` and ``backbone.embedding.embedding.position_embedding``.
* ``mindformers``: ``mindspore-ai/models`` ``official/nlp/Pangu_alpha`` (2021-09 on, built on
  ``TransformerEncoder``) and MindFormers' ``models/pangualpha``: ``backbone.embedding.word_embedding``,
  ``backbone.embedding.position_embedding``, ``backbone.top_query_embedding``.
* ``pangu1``: the earlier model_zoo ``pangu1`` layout, ``backbone.word_embedding`` and
  ``backbone.position_embedding`` beside the same blocks.  Import only; its block orientation is taken to be
  the ``mindformers`` one (its source was not available to check).

Orientation: the attention's ``dense1/2/3`` (query, key, value) are ``nn.Dense`` / ``_Linear(transpose_b=True)``
and store ``[out, in]``; the attention ``projection`` and the FFN's ``mapping`` and ``projection`` are
``Mapping`` / ``_Linear(transpose_b=False)`` and store ``[in, out]``, as this project's ``Linear`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from mindformers_sigma.model import names


@dataclass(frozen=True)
class Naming:
    """Where one release keeps the three tables (the blocks are named alike in all of them)."""

    name: str
    word: str
    position: str
    top_query: str


NAMINGS = {
    "pcl": Naming("pcl", "embedding_table", "backbone.embedding.embedding.position_embedding.embedding_table",
                  "backbone.top_query_embedding_table"),
    "mindformers": Naming("mindformers", "backbone.embedding.word_embedding.embedding_table",
                          "backbone.embedding.position_embedding.embedding_table",
                          "backbone.top_query_embedding.embedding_table"),
    "pangu1": Naming("pangu1", "backbone.word_embedding.embedding_table", "backbone.position_embedding.embedding_table",
                     "backbone.top_query_embedding.embedding_table"),
}
EXPORT_NAMINGS = ("pcl", "mindformers")

BLOCK = "backbone.blocks.{index}"
TOP_QUERY_LAYER = "backbone.top_query_layer"
FINAL_NORM = "backbone.layernorm"

# (official name inside a block, this project's name inside a layer, stored transposed)
LAYER_TENSORS: Tuple[Tuple[str, str, bool], ...] = (
    ("layernorm1.gamma", "attention_norm.gamma", False),
    ("layernorm1.beta", "attention_norm.beta", False),
    ("attention.dense1.weight", "attention.query.weight", True),
    ("attention.dense1.bias", "attention.query.bias", False),
    ("attention.dense2.weight", "attention.key.weight", True),
    ("attention.dense2.bias", "attention.key.bias", False),
    ("attention.dense3.weight", "attention.value.weight", True),
    ("attention.dense3.bias", "attention.value.bias", False),
    ("attention.projection.weight", "attention.output.weight", False),
    ("attention.projection.bias", "attention.output.bias", False),
    ("layernorm2.gamma", "ffn_norm.gamma", False),
    ("layernorm2.beta", "ffn_norm.beta", False),
    ("output.mapping.weight", "ffn.mapping.weight", False),
    ("output.mapping.bias", "ffn.mapping.bias", False),
    ("output.projection.weight", "ffn.projection.weight", False),
    ("output.projection.bias", "ffn.projection.bias", False),
)

# what a training or inference run saves beside the weights: optimizer state and step counters (prefixes) and
# use_past's key/value caches (suffixes); an import leaves them out
NOT_WEIGHTS_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "global_step", "learning_rate",
                        "beta1_power", "beta2_power", "scale_sense", "current_iterator_step",
                        "last_overflow_iterator_step", "epoch_num", "step_num", "loss_scale")
NOT_WEIGHTS_SUFFIXES = (".key_past", ".value_past")


def is_weight(official_name: str) -> bool:
    return not (official_name.startswith(NOT_WEIGHTS_PREFIXES) or official_name.endswith(NOT_WEIGHTS_SUFFIXES))


def official_layer_prefix(index: int, num_layers: int) -> str:
    """The official prefix of layer ``index`` (0 = bottom) of a ``num_layers``-layer model (stage_num 1)."""
    return TOP_QUERY_LAYER if index == num_layers - 1 else BLOCK.format(index=index)


def name_map(naming: Naming, num_layers: int) -> Dict[str, Tuple[str, bool]]:
    """official name -> (this project's name, stored transposed), for every weight of a dense model."""
    mapping = {
        naming.word: (names.WORD_EMBEDDING, False),
        naming.position: (names.POSITION_EMBEDDING, False),
        naming.top_query: (names.TOP_QUERY_EMBEDDING, False),
        f"{FINAL_NORM}.gamma": (f"{names.FINAL_NORM}.gamma", False),
        f"{FINAL_NORM}.beta": (f"{names.FINAL_NORM}.beta", False),
    }
    for index in range(num_layers):
        official, ours = official_layer_prefix(index, num_layers), names.layer_prefix(index, num_layers)
        for official_tensor, our_tensor, transposed in LAYER_TENSORS:
            mapping[f"{official}.{official_tensor}"] = (f"{ours}.{our_tensor}", transposed)
    return mapping
