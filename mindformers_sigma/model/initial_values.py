"""Initial weights that do not depend on how the model is split.

A parameter's initial value is drawn by numpy from ``(context.seed, its name)`` (an expert
tensor's, expert by expert, from ``(seed, name, expert)``), and a rank keeps its slice of it
(``names.split_axes``).  So one process, any data x model x expert layout and ECSS's host store
(which draws only the experts it holds) all start from the same model.  Matrices and embeddings
are normal(0, ``init_std``); biases, LayerNorm gains and shifts and routing tables keep their
constant initial values.
"""

from __future__ import annotations

import zlib
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.distributed.topology import Topology, optimizer_shard_index, slice_of
from mindformers_sigma.model import names


def is_drawn(name: str) -> bool:
    """Whether a parameter starts random (the others start constant)."""
    return not names.is_bias_or_norm(name) and not name.endswith(names.ROUTING_TABLE) and not names.is_moment(name)


def _generator(seed: int, name: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *more])


def expert_draw(seed: int, name: str, expert: int, shape: Sequence[int], init_std: float) -> np.ndarray:
    """Expert ``expert``'s whole slice ``shape`` of expert tensor ``name``."""
    return _generator(seed, name, expert).standard_normal(tuple(shape), dtype=np.float32) * np.float32(init_std)


def local_slice(name: str, full_shape: Sequence[int], topology: Topology, vocab_parallel: bool) -> Tuple[slice, ...]:
    """The part of a whole tensor this rank holds."""
    found = []
    for size, axis in zip(full_shape, names.split_axes(name, len(full_shape), vocab_parallel)):
        if axis is None:
            found.append(slice(None))
            continue
        index, count = slice_of(topology, axis)
        found.append(slice(index * (size // count), (index + 1) * (size // count)))
    return tuple(found)


def piece_of(name: str, whole: Sequence[int], held: Sequence[int], topology: Topology,
             vocab_parallel: bool) -> Tuple[slice, ...]:
    """Where a rank's ``held`` piece of parameter ``name`` sits in the ``whole`` tensor: its model and expert
    slice, and, when it holds fewer rows than that (an optimizer-sharded moment), its rows of the slice."""
    part = local_slice(name, whole, topology, vocab_parallel)
    rows = range(whole[0])[part[0]] if whole else range(0)
    if held and held[0] < len(rows):
        index = optimizer_shard_index(topology, names.is_expert_parameter(name))
        part = (slice(rows.start + index * held[0], rows.start + (index + 1) * held[0]),) + part[1:]
    return part


def full_shape(name: str, local: Sequence[int], topology: Topology, vocab_parallel: bool) -> Tuple[int, ...]:
    """The whole tensor's shape from this rank's slice."""
    return tuple(size * (1 if axis is None else slice_of(topology, axis)[1])
                 for size, axis in zip(local, names.split_axes(name, len(local), vocab_parallel)))


def drawn_value(config: SigmaConfig, name: str, local: Sequence[int], topology: Topology) -> np.ndarray:
    """This rank's slice of parameter ``name``'s initial value."""
    vocab_parallel = config.parallel.vocab_parallel
    whole = full_shape(name, local, topology, vocab_parallel)
    part = local_slice(name, whole, topology, vocab_parallel)
    seed, std = config.context.seed, config.model.init_std
    if names.is_expert_parameter(name):
        experts = range(whole[0])[part[0]]
        return np.stack([expert_draw(seed, name, expert, whole[1:], std)[part[1:]] for expert in experts])
    return (_generator(seed, name).standard_normal(whole, dtype=np.float32) * np.float32(std))[part]


def initial_values(config: SigmaConfig, parameters: Iterable[Tuple[str, Tuple[int, ...]]],
                   topology: Topology = Topology()) -> Dict[str, np.ndarray]:
    """``name -> this rank's initial slice`` for every drawn parameter among ``(name, local shape)``."""
    return {name: drawn_value(config, name, shape, topology) for name, shape in parameters if is_drawn(name)}


def initialize(network, config: SigmaConfig, topology: Topology = Topology(), skip_experts: bool = False) -> None:
    """Overwrite every drawn parameter of a built ``network`` with this rank's slice of its initial value
    (``skip_experts``: ECSS's slab, which the host store fills)."""
    from mindspore import Tensor

    params = [p for p in network.get_parameters() if not (skip_experts and names.is_expert_parameter(p.name))]
    values = initial_values(config, [(p.name, tuple(p.shape)) for p in params], topology)
    for param in params:
        if param.name in values:
            param.set_data(Tensor(values[param.name]))
