"""Every expert's fp32 weights and both AdamW moments, in host memory.

One contiguous ``[E, ...]`` array per sparse layer and tensor (``w1 [E, H, F]``, ``b1 [E, 1, F]``,
``w2 [E, F, H]``, ``b2 [E, 1, H]``), so loading K experts is one fancy-index copy.  The arrays are
in RAM, or memory-mapped ``.npy`` files in a folder (``ecss.host_store: mmap``), whose pages the
OS can write back and evict: the store is filled expert by expert, and a safetensors checkpoint
is written from it and read back into it in chunks, so a store larger than RAM trains.  Either
way a checkpoint holds the whole store, so a killed run resumes from its checkpoint whatever
state the files were left in.  Names follow the model's parameters
(``backbone.layers.2.ffn.experts.w1``, moments ``adam_m.`` / ``adam_v.`` and the name), so an
ECSS checkpoint holds exactly what a plain one does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from mindformers_sigma.model.names import EXPERT_TENSORS, expert_tensor_names, moment_names


@dataclass
class LayerExperts:
    """One sparse layer's experts (``layer``: the layer's parameter-name prefix), by tensor (``EXPERT_TENSORS``)."""

    layer: str
    weights: Dict[str, np.ndarray]
    moment1: Dict[str, np.ndarray]
    moment2: Dict[str, np.ndarray]

    def entries(self) -> Dict[str, np.ndarray]:
        """Checkpoint entries: the weights and both moments under their plain-model names."""
        found = {}
        for tensor, name in zip(EXPERT_TENSORS, expert_tensor_names(self.layer)):
            first, second = moment_names(name)
            found[name] = self.weights[tensor]
            found[first] = self.moment1[tensor]
            found[second] = self.moment2[tensor]
        return found


class HostExpertStore:
    """The experts of every sparse layer, in layer order."""

    def __init__(self, layers: List[LayerExperts]):
        self.layers = layers

    @classmethod
    def allocate(cls, layers: List[str], shapes: Dict[str, Tuple[int, ...]], num_experts: int,
                 directory: Optional[str] = None) -> "HostExpertStore":
        """Zero weights and moments for ``num_experts`` experts of each layer (``shapes``: one
        expert's, per tensor), in RAM or in memory-mapped files under ``directory``.  No page is
        touched until written (``np.zeros`` and new files are both lazily zero), so filling the
        store expert by expert never holds more than the store's own pages."""
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

        def array(name: str, shape: Tuple[int, ...]) -> np.ndarray:
            if directory is None:
                return np.zeros(shape, np.float32)
            return np.lib.format.open_memmap(os.path.join(directory, name + ".npy"), mode="w+", dtype=np.float32,
                                             shape=shape)

        found = []
        for layer in layers:
            tensors = dict(zip(EXPERT_TENSORS, expert_tensor_names(layer)))
            kinds = [{t: array(name, (num_experts, *shapes[t])) for t, name in tensors.items()},
                     *({t: array(moment_names(name)[which], (num_experts, *shapes[t])) for t, name in tensors.items()}
                       for which in (0, 1))]
            found.append(LayerExperts(layer, *kinds))
        return cls(found)

    def fault_in_zeros(self) -> None:
        """Write the zero arrays of a fresh RAM store (moments, biases) once, so their pages are
        resident from the start: else each expert's first host update pays their page faults
        (5x a resident row's time, measured), and the process's RSS is below the store."""
        for layer in self.layers:
            for arrays in (layer.moment1, layer.moment2, {t: layer.weights[t] for t in ("b1", "b2")}):
                for array in arrays.values():
                    array.fill(0.0)

    def flush(self) -> None:
        """Write memory-mapped arrays' dirty pages to their files (nothing to do in RAM)."""
        for value in self.entries().values():
            if isinstance(value, np.memmap):
                value.flush()

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for layer in self.layers for array in layer.entries().values())

    def entries(self) -> Dict[str, np.ndarray]:
        found = {}
        for layer in self.layers:
            found.update(layer.entries())
        return found
