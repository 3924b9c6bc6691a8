"""ECSS around each training step: load the step's experts into the device slab before it,
bring their gradients back and update them on the host after it.

The device graph sees only the slab (``[slab_experts, ...]`` per expert tensor and layer) and
plans that name slots, so it compiles once whatever the number of experts.  The dense
parameters keep the device optimizer; the global-norm clip and the overflow skip are computed
on the device over dense and slab gradients together (``training/train_step.py``), and the host
applies the same clipped gradients, or skips the same steps.
"""

from __future__ import annotations

import shutil
import time
from typing import Dict, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.ecss.host_adamw import AdamWSettings, adamw_rows
from mindformers_sigma.ecss.host_store import EXPERT_TENSORS, HostExpertStore
from mindformers_sigma.ecss.slab import SlabAssignment, assign_slots, slab_size
from mindformers_sigma.errors import DataError


class SlabWriter(nn.Cell):
    """Host -> device: write expert rows into slots of one layer's slab parameters, in one graph
    whose row count is dynamic (so only the active experts' bytes move)."""

    def __init__(self, slab: Sequence[Parameter]):
        super().__init__(auto_prefix=False)
        self.slab = ms.ParameterTuple(slab)
        self.set_inputs(Tensor(shape=[None], dtype=ms.int32),
                        *(Tensor(shape=[None, *p.shape[1:]], dtype=p.dtype) for p in slab))

    def construct(self, slots, w1, b1, w2, b2):
        done = ops.scatter_update(self.slab[0], slots, w1)
        done = ops.depend(ops.scatter_update(self.slab[1], slots, b1), done)
        done = ops.depend(ops.scatter_update(self.slab[2], slots, w2), done)
        return ops.depend(ops.scatter_update(self.slab[3], slots, b2), done)


class ExpertOffload:
    """The host side of ECSS for one training run.

    ``dense_semantics`` (tests only) updates every expert each step, with zero gradients for the
    untouched ones, as the device AdamW does; ECSS's own rule leaves untouched experts alone.
    """

    dense_semantics = False

    def __init__(self, slab_params: Sequence[Parameter], store: HostExpertStore, slab_experts: int,
                 settings: AdamWSettings, routing_tables: Dict[str, np.ndarray],
                 store_directory: Optional[str] = None):
        self.store = store
        self.routing_tables = routing_tables  # the layers' own arrays (MoELayer.host_routing_table)
        self.store_directory = store_directory  # where a memory-mapped store's files are (None: in RAM)
        self.slab_experts = slab_experts
        self.settings = settings
        prefixes = [layer.prefix for layer in store.layers]
        # host_grads come in slab_params order: remember each one's (layer, tensor)
        self.grad_order = [(prefixes.index(p.name.rsplit(".", 1)[0]), p.name.rsplit(".", 1)[1]) for p in slab_params]
        by_name = {p.name: p for p in slab_params}
        self.writers = [SlabWriter([by_name[f"{prefix}.{t}"] for t in EXPERT_TENSORS]) for prefix in prefixes]
        self.assignment: Optional[SlabAssignment] = None  # the slab as the running (or last) step sees it
        self._pending: Optional[tuple] = None  # the next step's, staged and not yet loaded
        self._updated = True  # whether the host update of the step using ``assignment`` is done
        self._staged: List[List[np.ndarray]] = []
        self.device_resident_bytes = 0
        self.last: Dict[str, object] = {}
        # bytes over every step; seconds over the timed steps (those that compiled nothing), as tokens/s
        self.totals = {"h2d_bytes": 0, "d2h_bytes": 0, "timed_steps": 0, "transfer_seconds": 0.0,
                       "host_update_seconds": 0.0}

    @classmethod
    def build(cls, config: SigmaConfig, slab_params: Sequence[Parameter], routing_tables: Dict[str, np.ndarray],
              store_directory: Optional[str] = None) -> "ExpertOffload":
        """A fresh store: every expert drawn from the distribution ``BatchedExperts`` uses (normal
        ``init_std`` matrices, zero biases), with numpy seeded by ``context.seed`` and the layer
        (so not the plain model's draw); memory-mapped under ``store_directory`` with
        ``ecss.host_store: mmap``."""
        if config.ecss.host_store == "mmap" and store_directory is None:
            raise DataError("ecss.host_store: mmap keeps the expert store in files under --out; pass --out, or "
                            "set ecss.host_store: ram")
        model, moe, train = config.model, config.moe, config.train
        prefixes = list(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in slab_params))
        shapes = {"w1": (model.hidden_size, model.ffn_hidden_size), "b1": (1, model.ffn_hidden_size),
                  "w2": (model.ffn_hidden_size, model.hidden_size), "b2": (1, model.hidden_size)}
        weights = []
        for layer, _ in enumerate(prefixes):
            rng = np.random.default_rng([config.context.seed, layer])
            weights.append({name: (rng.standard_normal((moe.num_experts, *shape), dtype=np.float32)
                                   * np.float32(model.init_std) if name[0] == "w"
                                   else np.zeros((moe.num_experts, *shape), np.float32))
                            for name, shape in shapes.items()})
        settings = AdamWSettings(train.beta1, train.beta2, train.expert_eps,
                                 {name: train.weight_decay if name[0] == "w" else 0.0 for name in EXPERT_TENSORS})
        directory = store_directory if config.ecss.host_store == "mmap" else None
        return cls(slab_params, HostExpertStore.from_weights(prefixes, weights, directory), slab_size(config),
                   settings, routing_tables, directory)

    def stage(self, plans: List[np.ndarray], num_tokens: int) -> List[np.ndarray]:
        """Plan the step's slab and copy its experts' rows out of the store; returns the plans with
        experts replaced by slots.  May run in a background thread while the previous step runs
        (``ecss.prefetch``): rows of experts that step may still update are copied again by
        :meth:`load`."""
        started = time.perf_counter()
        assignment = assign_slots(plans, num_tokens, self.slab_experts,
                                  [layer.prefix.rsplit(".ffn.", 1)[0] for layer in self.store.layers])
        in_flight = not self._updated and self.assignment is not None  # its host update may still run
        rows, stale = [], []
        for index, (layer, experts) in enumerate(zip(self.store.layers, assignment.active)):
            rows.append([layer.weights[t][experts] for t in EXPERT_TENSORS])
            if not in_flight:
                stale.append(np.zeros(experts.size, bool))
            elif self.dense_semantics:  # that update writes every expert
                stale.append(np.ones(experts.size, bool))
            else:
                stale.append(np.isin(experts, self.assignment.active[index]))
        self._pending = (assignment, rows, stale, time.perf_counter() - started)
        return [assignment.remap(plan, num_tokens) for plan in plans]

    def load(self) -> None:
        """Host -> device, right before the step: refresh the rows the previous step updated after
        :meth:`stage` copied them, then write every staged row into the slab."""
        started = time.perf_counter()
        assignment, rows, stale, staging_seconds = self._pending
        moved = 0
        for writer, layer, experts, layer_rows, layer_stale in zip(self.writers, self.store.layers,
                                                                  assignment.active, rows, stale):
            if layer_stale.any():
                for tensor, array in zip(EXPERT_TENSORS, layer_rows):
                    array[layer_stale] = layer.weights[tensor][experts[layer_stale]]
            writer(Tensor(np.arange(len(experts), dtype=np.int32)), *(Tensor.from_numpy(r) for r in layer_rows))
            moved += sum(r.nbytes for r in layer_rows)
        self._staged = rows  # the writers read these arrays without a copy (from_numpy): keep them alive
        self.assignment, self._updated = assignment, False
        seconds = staging_seconds + time.perf_counter() - started
        self.last = {"ecss_h2d_bytes": moved, "ecss_active_experts": [int(e.size) for e in assignment.active],
                     "ecss_refreshed_experts": [int(m.sum()) for m in stale], "ecss_transfer_seconds": seconds}
        self.totals["h2d_bytes"] += moved

    def update(self, host_grads: Sequence[Tensor], finite: bool, lr: float, timed: bool = True) -> None:
        """Bring the active slots' (clipped, unscaled) gradients back and update those experts;
        an overflow step, skipped on the device, is skipped here too.  ``timed``: the step's
        seconds count in the totals (not when it compiled a graph)."""
        started = time.perf_counter()
        active = self.assignment.active
        grads: List[Dict[str, np.ndarray]] = [{} for _ in active]
        moved = 0
        for grad, (layer, tensor) in zip(host_grads, self.grad_order):
            rows = grad[:len(active[layer])].asnumpy() if len(active[layer]) else np.zeros((0,), np.float32)
            grads[layer][tensor] = rows
            moved += rows.nbytes
        fetched = time.perf_counter()
        if finite:
            for layer, experts, layer_grads in zip(self.store.layers, active, grads):
                if self.dense_semantics:
                    experts, layer_grads = _every_expert(layer.weights, experts, layer_grads)
                if experts.size:
                    adamw_rows(layer, experts, layer_grads, lr, self.settings)
        done = time.perf_counter()
        self.last.update(ecss_d2h_bytes=moved, ecss_host_update_seconds=done - fetched,
                         ecss_transfer_seconds=self.last["ecss_transfer_seconds"] + fetched - started,
                         ecss_device_resident_bytes=self.device_resident_bytes,
                         ecss_host_resident_bytes=self.host_resident_bytes)
        self._updated = True
        self.totals["d2h_bytes"] += moved
        if timed:
            self.totals["timed_steps"] += 1
            self.totals["transfer_seconds"] += self.last["ecss_transfer_seconds"]
            self.totals["host_update_seconds"] += done - fetched

    @property
    def host_resident_bytes(self) -> int:
        """The store and the routing tables."""
        return self.store.nbytes + sum(table.nbytes for table in self.routing_tables.values())

    def discard_store_files(self) -> None:
        """Remove a memory-mapped store's files (scratch: every checkpoint holds the whole store)."""
        if self.store_directory is not None:
            shutil.rmtree(self.store_directory, ignore_errors=True)

    def checkpoint_parameters(self, parameters: Dict[str, object]) -> Dict[str, object]:
        """A plain checkpoint's entries: the slab's names carry the whole store instead."""
        self.store.flush()
        entries = dict(parameters)
        entries.update({name: Tensor(array) for name, array in self.store.entries().items()})
        entries.update({name: Tensor(table) for name, table in self.routing_tables.items()})
        return entries

    def take_from_checkpoint(self, stored: Dict[str, Parameter], source: str) -> Dict[str, Parameter]:
        """Load the store from checkpoint entries; returns the entries left for the device cell."""
        names = set(self.store.entries())
        self.store.load({name: stored[name].asnumpy() for name in names if name in stored}, source)
        for name, table in self.routing_tables.items():
            saved = stored.get(name)
            if saved is None or saved.shape != table.shape or saved.dtype != ms.int32:
                have = "missing" if saved is None else f"{saved.dtype} of shape {tuple(saved.shape)}"
                raise DataError(f"{source}: {name} is {have}, the model needs Int32 of shape {table.shape}; was it "
                                f"written with another config?")
            table[...] = saved.asnumpy()
        names |= set(self.routing_tables)
        return {name: value for name, value in stored.items() if name not in names}


def _every_expert(weights: Dict[str, np.ndarray], experts: np.ndarray, grads: Dict[str, np.ndarray]):
    """All experts, with zero gradients for those outside ``experts``."""
    full = {}
    for tensor, array in weights.items():
        full[tensor] = np.zeros_like(array)
        full[tensor][experts] = grads[tensor]
    return np.arange(len(next(iter(weights.values())))), full
