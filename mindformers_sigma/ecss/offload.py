"""ECSS around each training step: load the step's experts into the device slab before it,
bring their gradients back and update them on the host after it.

The device graph sees only the slab (``[slab_experts, ...]`` per expert tensor and layer) and
plans that name slots, so it compiles once whatever the number of experts.  The dense
parameters keep the device optimizer; the global-norm clip and the overflow skip are computed
on the device over dense and slab gradients together (``training/train_step.py``), and the host
applies the same clipped gradients, or skips the same steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.ecss.host_adamw import AdamWSettings, adamw_rows
from mindformers_sigma.ecss.host_store import HostExpertStore
from mindformers_sigma.ecss.slab import SlabLoad, plan_slab_loads, slab_size
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.model.initial_values import expert_draw, local_slice


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


@dataclass
class _StagedLoad:
    """One slab load of a step, staged: its experts' rows copied out of the store (per layer, per
    tensor) and which of them the previous step may still update (copied again before the load)."""

    load: SlabLoad
    rows: List[List[np.ndarray]]
    stale: List[np.ndarray]


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
        layers = [layer.layer for layer in store.layers]
        # host_grads come in slab_params order: remember each one's (layer, tensor)
        self.grad_order = [(layers.index(names.layer_of(p.name)), p.name.rsplit(".", 1)[1]) for p in slab_params]
        by_name = {p.name: p for p in slab_params}
        self.writers = [SlabWriter([by_name[name] for name in names.expert_tensor_names(layer)]) for layer in layers]
        self._pending: Optional[tuple] = None  # the next step's loads, staged and not yet begun
        self._staged: List[_StagedLoad] = []  # the running (or last) step's loads
        self._loaded = 0  # which of them the slab holds
        self._touched: Optional[List[np.ndarray]] = None  # per layer, the experts that step updates
        self._updated = True  # whether that step's host update is done
        self._host_sums: Optional[List[Dict[str, np.ndarray]]] = None  # with several loads: the step's gradients
        self._zero_grads: Optional[Tuple[Tensor, ...]] = None
        self.slab_shapes = [tuple(p.shape) for p in slab_params]
        self.device_resident_bytes = 0
        self.last: Dict[str, object] = {}
        # bytes over every step; seconds over the timed steps (those that compiled nothing), as tokens/s
        self.totals = {"h2d_bytes": 0, "d2h_bytes": 0, "slab_loads": 0, "timed_steps": 0, "transfer_seconds": 0.0,
                       "host_update_seconds": 0.0}

    @classmethod
    def build(cls, config: SigmaConfig, slab_params: Sequence[Parameter], routing_tables: Dict[str, np.ndarray],
              store_directory: Optional[str] = None, topology: Topology = Topology()) -> "ExpertOffload":
        """A fresh store of this rank's experts (``num_experts / expert_parallel`` of them, their model-parallel
        slices), each drawn as the plain model draws it (``model/initial_values.py``); memory-mapped under
        ``store_directory`` with ``ecss.host_store: mmap``.  Plans and slots name experts by their index
        among this rank's."""
        if config.ecss.host_store == "mmap" and store_directory is None:
            raise DataError("ecss.host_store: mmap keeps the expert store in files under --out; pass --out, or "
                            "set ecss.host_store: ram")
        model, moe, train = config.model, config.moe, config.train
        layers = list(dict.fromkeys(names.layer_of(p.name) for p in slab_params))
        whole = {"w1": (model.hidden_size, model.ffn_hidden_size), "b1": (1, model.ffn_hidden_size),
                 "w2": (model.ffn_hidden_size, model.hidden_size), "b2": (1, model.hidden_size)}
        mine = topology.expert_range(moe.num_experts)
        vocab_parallel = config.parallel.vocab_parallel
        parts = {t: local_slice(f"{names.expert_prefix(layers[0])}.{t}", (moe.num_experts,) + shape, topology,
                                vocab_parallel)[1:] for t, shape in whole.items()}
        shapes = {t: np.empty(shape)[parts[t]].shape for t, shape in whole.items()}
        directory = store_directory if config.ecss.host_store == "mmap" else None
        store = HostExpertStore.allocate(layers, shapes, len(mine), directory)
        for layer in store.layers:
            for tensor in ("w1", "w2"):
                name = f"{names.expert_prefix(layer.layer)}.{tensor}"
                for index, expert in enumerate(mine):
                    layer.weights[tensor][index] = expert_draw(config.context.seed, name, expert, whole[tensor],
                                                               model.init_std)[parts[tensor]]
        if directory is None:
            store.fault_in_zeros()
        settings = AdamWSettings(train.beta1, train.beta2, train.expert_eps,
                                 {t: 0.0 if names.is_bias_or_norm(t) else train.weight_decay
                                  for t in names.EXPERT_TENSORS})
        return cls(slab_params, store, slab_size(config), settings, routing_tables, directory)

    def summed_totals(self, sum_over_ranks: Callable[[List[float]], List[float]]) -> Dict[str, float]:
        """The totals summed over every rank (each rank moves and updates its own experts' slices)."""
        keys = ("h2d_bytes", "d2h_bytes", "host_resident_bytes", "host_update_seconds", "transfer_seconds")
        totals = dict(self.totals, host_resident_bytes=self.host_resident_bytes)
        return dict(zip([f"all_ranks_{key}" for key in keys], sum_over_ranks([totals[key] for key in keys])))

    def stage(self, plans: List[np.ndarray], num_tokens: int, micro_experts: List[List[np.ndarray]]
              ) -> List[np.ndarray]:
        """Plan the step's slab loads and copy their experts' rows out of the store; returns the
        plans with experts replaced by slots.  ``micro_experts[m][l]``: the experts micro-batch
        index ``m`` activates in layer ``l`` on any rank.  May run in a background thread while the
        previous step runs (``ecss.prefetch``): rows of experts that step may still update are
        copied again by :meth:`begin_step`."""
        started = time.perf_counter()
        loads = plan_slab_loads(micro_experts, self.slab_experts,
                                [layer.layer for layer in self.store.layers])
        in_flight = not self._updated and self._touched is not None  # its host update may still run
        staged = []
        for load in loads:
            rows, stale = [], []
            for index, (layer, experts) in enumerate(zip(self.store.layers, load.assignment.active)):
                rows.append([layer.weights[t][experts] for t in names.EXPERT_TENSORS])
                if not in_flight:
                    stale.append(np.zeros(experts.size, bool))
                elif self.dense_semantics:  # that update writes every expert
                    stale.append(np.ones(experts.size, bool))
                else:
                    stale.append(np.isin(experts, self._touched[index]))
            staged.append(_StagedLoad(load, rows, stale))
        self._pending = (staged, time.perf_counter() - started)
        return [next(s.load for s in staged if s.load.first <= micro <= s.load.last).assignment.remap(plan, num_tokens)
                for micro, plan in enumerate(plans)]

    def begin_step(self) -> Optional["ExpertOffload"]:
        """Host -> device, right before the step: refresh the staged rows the previous step updated
        after :meth:`stage` copied them, and load the slab.  Returns None when one load serves the
        whole step, else itself: the :class:`~mindformers_sigma.training.train_step.SlabReloads` that
        :func:`run_step` calls to reload the slab between micro-batches."""
        started = time.perf_counter()
        staged, staging_seconds = self._pending
        self._pending = None
        for item in staged:
            for layer, experts, layer_rows, layer_stale in zip(self.store.layers, item.load.assignment.active,
                                                              item.rows, item.stale):
                if layer_stale.any():
                    for tensor, array in zip(names.EXPERT_TENSORS, layer_rows):
                        array[layer_stale] = layer.weights[tensor][experts[layer_stale]]
        self._staged = staged
        self._touched = [np.unique(np.concatenate([s.load.assignment.active[layer] for s in staged]))
                         for layer in range(len(self.store.layers))]
        self._updated = False
        self.last = {"ecss_h2d_bytes": 0, "ecss_d2h_bytes": 0, "ecss_slab_loads": len(staged),
                     "ecss_active_experts": [int(e.size) for e in self._touched],
                     "ecss_loaded_experts": [int(sum(s.load.assignment.active[layer].size for s in staged))
                                             for layer in range(len(self.store.layers))],
                     "ecss_refreshed_experts": [int(sum(s.stale[layer].sum() for s in staged))
                                                for layer in range(len(self.store.layers))],
                     "ecss_transfer_seconds": staging_seconds + time.perf_counter() - started}
        if len(staged) == 1:
            self._host_sums = None
            self.write_load(0)
            return None
        self._host_sums = [{t: np.zeros((experts.size, *layer.weights[t].shape[1:]), np.float32)
                            for t in names.EXPERT_TENSORS} for layer, experts in zip(self.store.layers, self._touched)]
        return self

    def write_load(self, index: int) -> None:
        """Write staged load ``index``'s rows into the slab (only those rows move)."""
        started = time.perf_counter()
        item = self._staged[index]
        moved = 0
        for writer, layer_rows, experts in zip(self.writers, item.rows, item.load.assignment.active):
            writer(Tensor(np.arange(len(experts), dtype=np.int32)), *(Tensor.from_numpy(r) for r in layer_rows))
            moved += sum(r.nbytes for r in layer_rows)
        self._loaded = index  # the writers read the staged arrays without a copy (from_numpy): kept alive
        self.last["ecss_h2d_bytes"] += moved
        self.last["ecss_transfer_seconds"] += time.perf_counter() - started

    def _fetch(self, slab_grads: Sequence[Tensor]) -> List[Dict[str, np.ndarray]]:
        """Device -> host: the loaded experts' rows of the slab's gradients, per layer and tensor."""
        started = time.perf_counter()
        active = self._staged[self._loaded].load.assignment.active
        grads: List[Dict[str, np.ndarray]] = [{} for _ in active]
        for grad, (layer, tensor) in zip(slab_grads, self.grad_order):
            grads[layer][tensor] = (grad[:len(active[layer])].asnumpy() if len(active[layer])
                                    else np.zeros((0, *grad.shape[1:]), np.float32))
            self.last["ecss_d2h_bytes"] += grads[layer][tensor].nbytes
        self.last["ecss_transfer_seconds"] += time.perf_counter() - started
        return grads

    # SlabReloads: the hooks run_step calls for a step of several loads.

    @property
    def zero_grads(self) -> Tuple[Tensor, ...]:
        """Zeros in the slab's shapes, passed to the device update in place of gradients the host holds."""
        if self._zero_grads is None:
            self._zero_grads = tuple(Tensor(np.zeros(shape, np.float32)) for shape in self.slab_shapes)
        return self._zero_grads

    def before(self, micro: int) -> None:
        """Load the slab when micro-batch ``micro`` starts a load."""
        starts = [item.load.first for item in self._staged]
        if micro in starts:
            self.write_load(starts.index(micro))

    def ends_load(self, micro: int) -> bool:
        return micro == self._staged[self._loaded].load.last

    def take(self, slab_grads: Sequence[Tensor]) -> None:
        """Add the current load's (scaled, summed over its micro-batches) gradients to the host sums."""
        active = self._staged[self._loaded].load.assignment.active
        for sums, experts, step_experts, grads in zip(self._host_sums, active, self._touched,
                                                      self._fetch(slab_grads)):
            rows = np.searchsorted(step_experts, experts)
            for tensor in names.EXPERT_TENSORS:
                sums[tensor][rows] += grads[tensor]

    def host_squares(self) -> Tensor:
        """The sum of squares of the host-summed gradients (inf or nan when any is), float32."""
        squares = sum(np.sum(np.square(array, dtype=np.float64)) for sums in self._host_sums for array in sums.values())
        return Tensor(np.float32(squares))

    def update(self, host_grads: Sequence[Tensor], finite: bool, clip_factor: float, lr: float,
               timed: bool = True) -> None:
        """Update the step's experts on the host; an overflow step, skipped on the device, is
        skipped here too.  With one load ``host_grads`` are the slab's clipped gradients, still on
        the device; with several the host sums them and applies ``clip_factor`` (the device's
        unscale times clip) itself.  ``timed``: the step's seconds count in the totals (not when it
        compiled a graph)."""
        if self._host_sums is None:
            grads = self._fetch(host_grads)
        else:
            factor = np.float32(clip_factor)
            grads = [{t: array * factor for t, array in sums.items()} for sums in self._host_sums]
        started = time.perf_counter()
        if finite:
            for layer, experts, layer_grads in zip(self.store.layers, self._touched, grads):
                if self.dense_semantics:
                    experts, layer_grads = _every_expert(layer.weights, experts, layer_grads)
                if experts.size:
                    adamw_rows(layer, experts, layer_grads, lr, self.settings)
        done = time.perf_counter()
        self._host_sums = None
        self.last.update(ecss_host_update_seconds=done - started,
                         ecss_device_resident_bytes=self.device_resident_bytes,
                         ecss_host_resident_bytes=self.host_resident_bytes)
        self._updated = True
        self.totals["h2d_bytes"] += self.last["ecss_h2d_bytes"]
        self.totals["d2h_bytes"] += self.last["ecss_d2h_bytes"]
        self.totals["slab_loads"] += len(self._staged)
        if timed:
            self.totals["timed_steps"] += 1
            self.totals["transfer_seconds"] += self.last["ecss_transfer_seconds"]
            self.totals["host_update_seconds"] += done - started

    @property
    def host_resident_bytes(self) -> int:
        """The store and the routing tables."""
        return self.store.nbytes + sum(table.nbytes for table in self.routing_tables.values())

    def discard_store_files(self) -> None:
        """Remove a memory-mapped store's files (scratch: every checkpoint holds the whole store),
        and the store folder once no rank's files are left in it."""
        if self.store_directory is not None:
            shutil.rmtree(self.store_directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.store_directory))

    def checkpoint_parameters(self, parameters: Dict[str, object]) -> Dict[str, object]:
        """A plain checkpoint's entries: the slab's names carry the whole store (its own arrays,
        which a safetensors checkpoint streams) and the host's routing tables."""
        self.store.flush()
        return {**parameters, **self.host_arrays()}

    def host_arrays(self) -> Dict[str, np.ndarray]:
        """What the host holds, under the plain model's names: the store and the routing tables."""
        return {**self.store.entries(), **self.routing_tables}


@contextlib.contextmanager
def scratch_store(offload: Optional[ExpertOffload]) -> Iterator[None]:
    """A memory-mapped store's files are scratch (every checkpoint holds the whole store): removed when
    the run leaves its loop, finished, stopped or failed (a disk that filled up gets its space back).
    A SIGKILL leaves them; the next run replaces them."""
    try:
        yield
    finally:
        if offload is not None:
            offload.discard_store_files()


def _every_expert(weights: Dict[str, np.ndarray], experts: np.ndarray, grads: Dict[str, np.ndarray]):
    """All experts, with zero gradients for those outside ``experts``."""
    full = {}
    for tensor, array in weights.items():
        full[tensor] = np.zeros_like(array)
        full[tensor][experts] = grads[tensor]
    return np.arange(len(next(iter(weights.values())))), full

