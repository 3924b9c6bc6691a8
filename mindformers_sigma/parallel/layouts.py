"""Every parameter of a config's train step, from the config alone, with its layout on the mesh.

The names and shapes mirror the Cells of ``mindformers_sigma.model`` and the optimizer
(a test checks them against a built model), so the planner and the strategy files need no
weights.  A layout is MindSpore's: a device matrix, a tensor map (entry ``i`` names the
device-matrix axis counted from the right that splits dimension ``i``, -1 for none) and the
parallel optimizer's shard (``opt_weight_shard_size`` ranks, ``opt_weight_shard_step`` apart).

The split rules (one table, used by the op strategies too):
* attention Q/K/V and the FFN's first matmul are column-parallel (output features over mp),
  the attention output and the FFN's second matmul row-parallel (input features over mp);
* experts ``[E, H, F]`` split E over ``expert_parallel`` and F over mp;
* the word embedding (and the tied head) is split on the vocabulary over mp with
  ``parallel.vocab_parallel``, else replicated; everything else is replicated;
* with ``parallel.optimizer_shard`` the AdamW moments of every trainable weight are also split on
  dimension 0 over the data-parallel ranks that hold the same slice (``dp`` of them for a dense
  weight, ``dp / ep`` for an expert tensor), where that dimension divides; the weights stay whole
  slices (``parallel/optimizer_shard.py`` updates each rank's rows and gathers them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from mindformers_sigma.config import ConfigError, SigmaConfig
from mindformers_sigma.ecss.slab import slab_for_rows, slab_size
from mindformers_sigma.model import names
from mindformers_sigma.parallel.mesh import DeviceMesh, micro_batch_rows

COLUMN, ROW = "column", "row"
LINEAR_ROLES = {"query": COLUMN, "key": COLUMN, "value": COLUMN, "output": ROW, "mapping": COLUMN, "projection": ROW}
FLOAT32, INT32 = "float32", "int32"


@dataclass(frozen=True)
class ParameterLayout:
    name: str
    shape: Tuple[int, ...]
    dtype: str
    trainable: bool
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[int, ...]
    stages: Tuple[int, ...]  # pipeline stages that hold it (the tied word table: the first and the last)
    opt_shard_size: int = 0
    opt_shard_step: int = 0
    kind: str = "dense"  # dense | embedding | expert | optimizer | state

    @property
    def splits(self) -> Tuple[int, ...]:
        """How many pieces each dimension is cut into (model/expert parallel only)."""
        return tuple(1 if axis < 0 else self.dev_matrix[len(self.dev_matrix) - 1 - axis] for axis in self.tensor_map)

    @property
    def shard_shape(self) -> Tuple[int, ...]:
        """The slice one device holds, the optimizer shard included."""
        shape = [size // split for size, split in zip(self.shape, self.splits)]
        if self.opt_shard_size and shape:
            shape[0] //= self.opt_shard_size
        return tuple(shape)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def shard_elements(self) -> int:
        return math.prod(self.shard_shape)


@dataclass
class _Builder:
    config: SigmaConfig
    mesh: DeviceMesh
    layouts: List[ParameterLayout] = field(default_factory=list)

    def add(self, name: str, shape: Tuple[int, ...], split: Tuple[Optional[str], ...], stages: Tuple[int, ...],
            kind: str = "dense", dtype: str = FLOAT32, trainable: bool = True) -> None:
        """``split[i]``: "mp", "ep" or None for dimension i."""
        expert = "ep" in split
        matrix = self.mesh.expert_matrix if expert else self.mesh.dense_matrix
        axis_of = {"mp": 0, "ep": 1} if expert else {"mp": 0}
        tensor_map = tuple(-1 if s is None else axis_of[s] for s in split)
        for dim, (size, axis) in enumerate(zip(shape, tensor_map)):
            parts = 1 if axis < 0 else matrix[len(matrix) - 1 - axis]
            if size % parts:
                what = "parallel.expert_parallel" if split[dim] == "ep" else "parallel.model_parallel"
                raise ConfigError(what, parts, f"does not divide dimension {dim} ({size}) of {name} "
                                               f"{list(shape)}; choose a divisor", self.config.source)
        self.layouts.append(ParameterLayout(name, tuple(shape), dtype, trainable, tuple(matrix), tensor_map, stages,
                                            kind=kind))
        if trainable and kind != "slab":
            moment_map, size, step = self._moment_layout(shape, matrix, tensor_map)
            for moment in names.moment_names(name):
                self.layouts.append(ParameterLayout(moment, tuple(shape), dtype, True, tuple(matrix),
                                                    moment_map, stages, size, step, "optimizer"))

    def _moment_layout(self, shape, matrix, tensor_map) -> Tuple[Tuple[int, ...], int, int]:
        """(tensor map, opt shard ranks, opt shard stride) of a weight's AdamW moments.

        With the optimizer shard the data-axis ranks (``matrix[0]``) that hold the same slice each keep the
        moments of 1/n of its rows (``parallel/optimizer_shard.py``), said in the terms MindSpore's
        transform reads: a replicated weight's moments are split on dimension 0 over the data axis; a
        weight split on other axes has its moments optimizer-sharded over the data axis.  A weight repeated
        over the model axis as well (an expert's ``b2`` under model parallel) keeps whole moments, as does
        a dimension 0 the ranks do not divide."""
        group = matrix[0]
        if not self.config.parallel.optimizer_shard or not shape or group == 1:
            return tensor_map, 0, 0
        if shape[0] // (1 if tensor_map[0] < 0 else matrix[len(matrix) - 1 - tensor_map[0]]) % group:
            return tensor_map, 0, 0
        if all(axis < 0 for axis in tensor_map):
            return (len(matrix) - 1,) + tuple(tensor_map[1:]), 0, 0
        used = {len(matrix) - 1 - axis for axis in tensor_map if axis >= 0}
        if any(size > 1 and index not in used for index, size in enumerate(matrix) if index > 0):
            return tensor_map, 0, 0
        return tensor_map, group, math.prod(matrix[1:])


def _linear(builder: _Builder, prefix: str, role_name: str, fan_in: int, fan_out: int, stages) -> None:
    role = LINEAR_ROLES[role_name]
    builder.add(f"{prefix}.{role_name}.weight", (fan_in, fan_out), (None, "mp") if role == COLUMN else ("mp", None),
                stages)
    builder.add(f"{prefix}.{role_name}.bias", (fan_out,), ("mp",) if role == COLUMN else (None,), stages)


def _layer(builder: _Builder, prefix: str, layer: int, sparse: bool, slots: Optional[int]) -> None:
    config, mesh = builder.config, builder.mesh
    h, f = config.model.hidden_size, config.model.ffn_hidden_size
    stages = (mesh.stage_of_layer(layer),)
    for norm in names.NORMS:
        builder.add(f"{prefix}.{norm}.gamma", (h,), (None,), stages)
        builder.add(f"{prefix}.{norm}.beta", (h,), (None,), stages)
    for role in names.ATTENTION_LINEARS:
        _linear(builder, f"{prefix}.{names.ATTENTION}", role, h, h, stages)
    if not sparse:
        mapping, projection = names.DENSE_FFN_LINEARS
        _linear(builder, f"{prefix}.{names.FFN}", mapping, h, f, stages)
        _linear(builder, f"{prefix}.{names.FFN}", projection, f, h, stages)
        return
    moe = config.moe
    if moe.table_routed and slots is None:  # a slab layer keeps its table on the host
        builder.add(names.routing_table_name(prefix), (moe.num_domains, config.model.vocab_size), (None, None),
                    stages, "state", INT32, trainable=False)
    if moe.learned_gate:
        builder.add(f"{prefix}.{names.GATE_WEIGHT}", (h, moe.num_experts), (None, None), stages)
    experts = slots * config.parallel.expert_parallel if slots else moe.num_experts  # a rank holds 1/ep of them
    kind = "slab" if slots else "expert"
    splits = {"w1": ((experts, h, f), ("ep", None, "mp")), "b1": ((experts, 1, f), ("ep", None, "mp")),
              "w2": ((experts, f, h), ("ep", "mp", None)), "b2": ((experts, 1, h), ("ep", None, None))}
    for tensor, name in zip(names.EXPERT_TENSORS, names.expert_tensor_names(prefix)):
        shape, split = splits[tensor]
        builder.add(name, shape, split, stages, kind)


def slab_slots(config: SigmaConfig, stage: int) -> int:
    """ECSS slab slots per rank of a sparse layer on ``stage``: ``ecss.slab_experts``, or when 0 the most of the
    rank's experts it can need at once.  Without pipeline stages that is a whole step (``ecss.slab.slab_size``); a
    pipeline stage holds its in-flight micro-batches of every data-parallel rank (their slab gradients are
    reduced slot by slot)."""
    if config.parallel.pipeline_stage == 1:
        return slab_size(config)
    mesh = DeviceMesh.of(config)
    in_flight = min(mesh.micro_batches, mesh.pipeline_stages - stage)
    needed = slab_for_rows(config, in_flight * micro_batch_rows(config) * mesh.data_parallel)
    chosen = config.ecss.slab_experts
    if not chosen:
        return needed
    if chosen < needed:
        raise ConfigError("ecss.slab_experts", chosen, f"is below the {needed} experts per rank that the in-flight "
                                                       f"micro-batches of all {mesh.data_parallel} data-parallel "
                                                       f"ranks can activate on pipeline stage {stage}; raise it "
                                                       f"or set 0", config.source)
    return chosen


def parameter_layouts(config: SigmaConfig) -> List[ParameterLayout]:
    """Every Parameter of the train step (weights, routing tables, AdamW moments, step counters)."""
    mesh = DeviceMesh.of(config)  # config.validate has checked it
    builder = _Builder(config, mesh)
    m = config.model
    first, last = 0, mesh.last_stage
    vocab_split = "mp" if config.parallel.vocab_parallel else None
    word_stages = tuple(sorted({first, last}))
    builder.add(names.WORD_EMBEDDING, (m.vocab_size, m.hidden_size), (vocab_split, None), word_stages, "embedding")
    builder.add(names.POSITION_EMBEDDING, (m.seq_length, m.hidden_size), (None, None), (first,), "embedding")
    for layer, prefix in enumerate(names.layer_prefixes(m)):
        slots = slab_slots(config, mesh.stage_of_layer(layer)) if config.ecss.enabled else None
        _layer(builder, prefix, layer, layer >= m.dense_layers, slots)
    builder.add(f"{names.FINAL_NORM}.gamma", (m.hidden_size,), (None,), (last,))
    builder.add(f"{names.FINAL_NORM}.beta", (m.hidden_size,), (None,), (last,))
    builder.add(names.TOP_QUERY_EMBEDDING, (m.seq_length, m.hidden_size), (None, None), (last,), "embedding")
    every_stage = tuple(range(mesh.pipeline_stages))
    for name, dtype in (("global_step", INT32), ("loss_scale", FLOAT32), ("loss_scale_clean_steps", INT32)):
        shape = (1,) if name == "global_step" else ()
        builder.add(name, shape, (None,) * len(shape), every_stage, "state", dtype, trainable=False)
    return builder.layouts

