"""Every expert's fp32 weights and both AdamW moments, in host memory.

One contiguous ``[E, ...]`` array per sparse layer and tensor (``w1 [E, H, F]``, ``b1 [E, 1, F]``,
``w2 [E, F, H]``, ``b2 [E, 1, H]``), so loading K experts is one fancy-index copy.  The arrays are
in RAM, or memory-mapped ``.npy`` files in a folder (``ecss.host_store: mmap``), whose pages the
OS can write back and evict.  (Building the store, checkpointing and resuming still pass the
whole store through RAM, so a store larger than RAM does not work yet.)  Either way a checkpoint
holds the whole store, so a killed run resumes from its checkpoint whatever state the files were
left in.  Names follow
the model's parameters (``backbone.layers.2.ffn.experts.w1``, moments ``adam_m.`` / ``adam_v.``
and the name), so an ECSS checkpoint holds exactly what a plain one does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from mindformers_sigma.errors import DataError

EXPERT_TENSORS = ("w1", "b1", "w2", "b2")
MOMENT_PREFIXES = ("adam_m.", "adam_v.")


@dataclass
class LayerExperts:
    """One sparse layer's experts: ``prefix`` is their parameters' name without the tensor."""

    prefix: str
    weights: Dict[str, np.ndarray]
    moment1: Dict[str, np.ndarray]
    moment2: Dict[str, np.ndarray]

    def entries(self) -> Dict[str, np.ndarray]:
        """Checkpoint entries: the weights and both moments under their plain-model names."""
        found = {}
        for tensor in EXPERT_TENSORS:
            name = f"{self.prefix}.{tensor}"
            found[name] = self.weights[tensor]
            found[MOMENT_PREFIXES[0] + name] = self.moment1[tensor]
            found[MOMENT_PREFIXES[1] + name] = self.moment2[tensor]
        return found


class HostExpertStore:
    """The experts of every sparse layer, in layer order."""

    def __init__(self, layers: List[LayerExperts]):
        self.layers = layers

    @classmethod
    def from_weights(cls, prefixes: List[str], weights: List[Dict[str, np.ndarray]],
                     directory: Optional[str] = None) -> "HostExpertStore":
        """A store taking over ``weights`` (as float32) with zero moments, as a fresh optimizer has;
        in memory-mapped files under ``directory`` when given."""
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

        def array(name: str, values: np.ndarray) -> np.ndarray:
            if directory is None:
                return np.require(values, np.float32, "C")  # no copy when it is already float32
            mapped = np.lib.format.open_memmap(os.path.join(directory, name + ".npy"), mode="w+",
                                               dtype=np.float32, shape=values.shape)
            mapped[...] = values
            return mapped

        layers = []
        for prefix, tensors in zip(prefixes, weights):
            kinds = [{t: array(f"{kind}{prefix}.{t}",
                               tensors[t] if kind == "" else np.zeros(tensors[t].shape, np.float32))
                      for t in EXPERT_TENSORS} for kind in ("",) + MOMENT_PREFIXES]
            layers.append(LayerExperts(prefix, *kinds))
        return cls(layers)

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

    def load(self, entries: Dict[str, np.ndarray], source: str) -> None:
        """Overwrite weights and moments from checkpoint arrays; a missing or misshapen one is one error line."""
        for layer in self.layers:
            for tensor in EXPERT_TENSORS:
                name = f"{layer.prefix}.{tensor}"
                for prefix, target in zip(("",) + MOMENT_PREFIXES, (layer.weights, layer.moment1, layer.moment2)):
                    array = entries.get(prefix + name)
                    if array is None or array.shape != target[tensor].shape or array.dtype != np.float32:
                        have = "missing" if array is None else f"{array.dtype} of shape {tuple(array.shape)}"
                        raise DataError(f"{source}: {prefix + name} is {have}, the model needs float32 of shape "
                                        f"{tuple(target[tensor].shape)}; was it written with another config?")
                    target[tensor][...] = array
