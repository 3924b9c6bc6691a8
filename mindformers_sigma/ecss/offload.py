"""ECSS around each training step: load the step's experts into the device slab before it,
bring their gradients back and update them on the host after it.

The host update overlaps the next step: RRE's plans name the next step's experts before this
step's update runs (``ecss.prefetch`` stages them while the step runs), so only the experts that
both steps use are updated before the next step starts; the rest are updated in a background
thread while it runs, and joined before the next update (AdamW applies a step's updates in order)
or before anything reads the store.

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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.ecss.host_adamw import AdamWSettings, adamw_rows
from mindformers_sigma.ecss.host_store import HostExpertStore, LayerExperts
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


class SlabFiller(nn.Cell):
    """Host -> device: overwrite one layer's whole slab (fixed shapes).  A load that fills more than
    half the slab uses it: MindSpore's CPU ScatterUpdate moves about 1 GB/s, a whole-tensor assign
    about 3 GB/s (measured on 128 MiB), so writing the unused slots too is still faster."""

    def __init__(self, slab: Sequence[Parameter]):
        super().__init__(auto_prefix=False)
        self.slab = ms.ParameterTuple(slab)

    def construct(self, w1, b1, w2, b2):
        done = ops.assign(self.slab[0], w1)
        done = ops.depend(ops.assign(self.slab[1], b1), done)
        done = ops.depend(ops.assign(self.slab[2], w2), done)
        return ops.depend(ops.assign(self.slab[3], b2), done)


class StagingBuffers:
    """Slab-shaped host arrays that a step's loads copy their experts into, kept from step to step:
    fresh arrays of hundreds of MiB each step spent most of the staging time in page faults.  Two
    generations alternate, as one step's buffers may still be in use while the next step is staged;
    a generation holds one set per load of its step."""

    def __init__(self, shapes: Sequence[Sequence[Tuple[int, ...]]]):
        self.shapes = shapes  # per layer, per tensor: the slab's shape
        self.generations: List[List[List[List[np.ndarray]]]] = [[], []]
        self.stage_count = 0

    def next_generation(self, loads: int) -> List[List[List[np.ndarray]]]:
        """``loads`` sets of buffers (per layer, per tensor) for the next staged step."""
        sets = self.generations[self.stage_count % 2]
        self.stage_count += 1
        while len(sets) < loads:
            sets.append([[np.zeros(shape, np.float32) for shape in layer] for layer in self.shapes])
        return sets[:loads]


ALL = "all"  # ExpertOffload._unsettled: every expert


@dataclass
class _StagedLoad:
    """One slab load of a step, staged: its experts' rows copied out of the store into the first rows
    of slab-shaped buffers (per layer, per tensor) and which of them the previous steps may still
    update (copied again before the load)."""

    load: SlabLoad
    buffers: List[List[np.ndarray]]
    stale: List[np.ndarray]


@dataclass
class _LayerUpdate:
    """Some of a step's experts in one layer: ``grads[t][grad_rows[i]]`` is ``experts[i]``'s gradient."""

    experts: np.ndarray
    grads: Dict[str, np.ndarray]
    grad_rows: np.ndarray


@dataclass
class _DeferredUpdate:
    """A step's host update of the experts the next step does not use, running in the background."""

    done: "Future[float]"  # its seconds
    experts: List[np.ndarray]  # per layer
    timed: bool


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
        layer_slabs = [[by_name[name] for name in names.expert_tensor_names(layer)] for layer in layers]
        self.writers = [SlabWriter(slab) for slab in layer_slabs]
        self.fillers = [SlabFiller(slab) for slab in layer_slabs]
        self.buffers = StagingBuffers([[tuple(p.shape) for p in slab] for slab in layer_slabs])
        self._pending: Optional[tuple] = None  # the next step's loads, staged and not yet begun
        self._staged: List[_StagedLoad] = []  # the running (or last) step's loads
        self._loaded = 0  # which of them the slab holds
        self._touched: Optional[List[np.ndarray]] = None  # per layer, the experts that step updates
        self._updated = True  # whether that step's host update (the part before the next step) is done
        self._deferred: Optional[_DeferredUpdate] = None  # the rest of the last update, in the background
        self._worker: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()  # staging (prefetch thread) reads what update changes
        self._host_sums: Optional[List[Dict[str, np.ndarray]]] = None  # with several loads: the step's gradients
        self._zero_grads: Optional[Tuple[Tensor, ...]] = None
        self.slab_shapes = [tuple(p.shape) for p in slab_params]
        self.device_resident_bytes = 0
        self.last: Dict[str, object] = {}
        # bytes over every step; seconds over the timed steps (those that compiled nothing), as tokens/s.
        # exposed_seconds: what the training loop waited for ECSS (loads, fetches, the host update's part
        # before the next step); transfer and host-update seconds also count what ran behind a step.
        self.totals = {"h2d_bytes": 0, "d2h_bytes": 0, "slab_loads": 0, "timed_steps": 0, "transfer_seconds": 0.0,
                       "host_update_seconds": 0.0, "exposed_seconds": 0.0}

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
        previous step runs (``ecss.prefetch``): rows of experts whose update may still be running
        are copied again by :meth:`begin_step`."""
        started = time.perf_counter()
        loads = plan_slab_loads(micro_experts, self.slab_experts,
                                [layer.layer for layer in self.store.layers])
        unsettled = self._unsettled()
        staged = []
        for load, buffers in zip(loads, self.buffers.next_generation(len(loads))):
            stale = []
            for index, (layer, experts) in enumerate(zip(self.store.layers, load.assignment.active)):
                _copy_rows(layer, experts, buffers[index], range(experts.size))
                stale.append(np.ones(experts.size, bool) if unsettled is ALL
                             else np.isin(experts, unsettled[index]))
            staged.append(_StagedLoad(load, buffers, stale))
        self._pending = (staged, time.perf_counter() - started)
        return [next(s.load for s in staged if s.load.first <= micro <= s.load.last).assignment.remap(plan, num_tokens)
                for micro, plan in enumerate(plans)]

    def _unsettled(self):
        """Per layer, the experts whose store rows an update may still change (``ALL``: any of them)."""
        with self._lock:
            layers = range(len(self.store.layers))
            parts = [[np.zeros(0, np.int32)] for _ in layers]
            if not self._updated and self._touched is not None:
                if self.dense_semantics:  # that update writes every expert
                    return ALL
                for index in layers:
                    parts[index].append(self._touched[index])
            if self._deferred is not None:
                for index in layers:
                    parts[index].append(self._deferred.experts[index])
            return [np.concatenate(part) for part in parts]

    def begin_step(self) -> Optional["ExpertOffload"]:
        """Host -> device, right before the step: refresh the staged rows updated after :meth:`stage`
        copied them, and load the slab.  Returns None when one load serves the whole step, else
        itself: the :class:`~mindformers_sigma.training.train_step.SlabReloads` that :func:`run_step`
        calls to reload the slab between micro-batches."""
        started = time.perf_counter()
        staged, staging_seconds = self._pending
        self._pending = None
        touched = [np.unique(np.concatenate([s.load.assignment.active[layer] for s in staged]))
                   for layer in range(len(self.store.layers))]
        if self._deferred is not None and any(np.intersect1d(a, b).size
                                              for a, b in zip(touched, self._deferred.experts)):
            self._join_deferred()  # staged for other experts than the update's split assumed
        for item in staged:
            for layer, experts, buffers, layer_stale in zip(self.store.layers, item.load.assignment.active,
                                                            item.buffers, item.stale):
                _copy_rows(layer, experts, buffers, np.flatnonzero(layer_stale))
        self._staged = staged
        with self._lock:
            self._touched = touched
            self._updated = False
        self.last = {"ecss_h2d_bytes": 0, "ecss_d2h_bytes": 0, "ecss_slab_loads": len(staged),
                     "ecss_active_experts": [int(e.size) for e in touched],
                     "ecss_loaded_experts": [int(sum(s.load.assignment.active[layer].size for s in staged))
                                             for layer in range(len(self.store.layers))],
                     "ecss_refreshed_experts": [int(sum(s.stale[layer].sum() for s in staged))
                                                for layer in range(len(self.store.layers))],
                     "ecss_transfer_seconds": staging_seconds + time.perf_counter() - started,
                     "ecss_exposed_seconds": time.perf_counter() - started}
        if len(staged) == 1:
            self._host_sums = None
            self.write_load(0)
            return None
        self._host_sums = [{t: np.zeros((experts.size, *layer.weights[t].shape[1:]), np.float32)
                            for t in names.EXPERT_TENSORS} for layer, experts in zip(self.store.layers, touched)]
        return self

    def write_load(self, index: int) -> None:
        """Write staged load ``index``'s rows into the slab: its rows only, or the whole slab when they fill
        more than half of it (:class:`SlabFiller`)."""
        started = time.perf_counter()
        item = self._staged[index]
        moved = 0
        for writer, filler, buffers, experts in zip(self.writers, self.fillers, item.buffers,
                                                    item.load.assignment.active):
            if 2 * len(experts) > self.slab_experts:
                filler(*(Tensor.from_numpy(buffer) for buffer in buffers))
                moved += sum(buffer.nbytes for buffer in buffers)
            else:
                rows = [buffer[:len(experts)] for buffer in buffers]
                writer(Tensor(np.arange(len(experts), dtype=np.int32)), *(Tensor.from_numpy(r) for r in rows))
                moved += sum(r.nbytes for r in rows)
        self._loaded = index  # the writers read the buffers without a copy (from_numpy)
        self.last["ecss_h2d_bytes"] += moved
        self._add_seconds(started, "ecss_transfer_seconds")

    def _add_seconds(self, started: float, key: str) -> None:
        """Count the seconds since ``started`` under ``key`` and as exposed (the training loop waited)."""
        elapsed = time.perf_counter() - started
        self.last[key] = self.last.get(key, 0.0) + elapsed
        self.last["ecss_exposed_seconds"] += elapsed

    def _fetch(self, slab_grads: Sequence[Tensor]) -> List[Dict[str, np.ndarray]]:
        """Device -> host: the loaded experts' rows of the slab's gradients, per layer and tensor (a
        whole slab's without a slice; on CPU ``asnumpy`` then shares the device's buffer)."""
        started = time.perf_counter()
        active = self._staged[self._loaded].load.assignment.active
        grads: List[Dict[str, np.ndarray]] = [{} for _ in active]
        for grad, (layer, tensor) in zip(slab_grads, self.grad_order):
            count = len(active[layer])
            grads[layer][tensor] = (grad.asnumpy() if count == grad.shape[0] else grad[:count].asnumpy() if count
                                    else np.zeros((0, *grad.shape[1:]), np.float32))
            self.last["ecss_d2h_bytes"] += grads[layer][tensor].nbytes
        self._add_seconds(started, "ecss_transfer_seconds")
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
        skipped here too.  The gradients (with one load the slab's, still on the device; with several
        the host's sums) are still loss-scaled: the update multiplies them by ``clip_factor`` (the
        device's unscale times clip) in its own pass.  Experts the next step (already staged) uses
        are updated now, the others in the background while it runs.  ``timed``: the step's seconds
        count in the totals (not when it compiled a graph)."""
        grads = self._fetch(host_grads) if self._host_sums is None else self._host_sums
        started = time.perf_counter()
        self._join_deferred()  # an expert's updates apply in step order
        now, later = self._split(grads if finite else [])
        update_seconds = _adamw_all(self.store, now, lr, clip_factor, self.settings)
        with self._lock:
            if later:
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecss-update")
                self._deferred = _DeferredUpdate(
                    self._worker.submit(_adamw_all, self.store, later, lr, clip_factor, self.settings),
                    [update.experts for update in later], timed)
            self._updated = True
        self._host_sums = None
        self.last.update(ecss_host_update_seconds=update_seconds,
                         ecss_deferred_experts=[int(update.experts.size) for update in later],
                         ecss_device_resident_bytes=self.device_resident_bytes,
                         ecss_host_resident_bytes=self.host_resident_bytes)
        self.last["ecss_exposed_seconds"] += time.perf_counter() - started
        self.totals["h2d_bytes"] += self.last["ecss_h2d_bytes"]
        self.totals["d2h_bytes"] += self.last["ecss_d2h_bytes"]
        self.totals["slab_loads"] += len(self._staged)
        if timed:
            self.totals["timed_steps"] += 1
            self.totals["transfer_seconds"] += self.last["ecss_transfer_seconds"]
            self.totals["host_update_seconds"] += update_seconds
            self.totals["exposed_seconds"] += self.last["ecss_exposed_seconds"]

    def _split(self, grads: List[Dict[str, np.ndarray]]) -> Tuple[List[_LayerUpdate], List[_LayerUpdate]]:
        """The step's updates as ``(now, later)``, per layer: ``now`` the experts the staged next step
        uses (all of them when no next step is staged yet), ``later`` the rest."""
        now, later = [], []
        following = self._pending[0] if self._pending is not None and not self.dense_semantics else None
        for index, (layer, experts, layer_grads) in enumerate(zip(self.store.layers, self._touched, grads)):
            if self.dense_semantics:
                experts, layer_grads = _every_expert(layer.weights, experts, layer_grads)
            rows = np.arange(experts.size)
            if following is None:
                now.append(_LayerUpdate(experts, layer_grads, rows))
                continue
            needed = np.isin(experts, np.concatenate([s.load.assignment.active[index] for s in following]))
            now.append(_LayerUpdate(experts[needed], layer_grads, rows[needed]))
            later.append(_LayerUpdate(experts[~needed], layer_grads, rows[~needed]))
        if not any(update.experts.size for update in later):
            later = []
        return now, later

    def _join_deferred(self) -> None:
        """Wait for the background part of the last update (its errors are raised here)."""
        deferred = self._deferred
        if deferred is None:
            return
        try:
            seconds = deferred.done.result()
        finally:
            with self._lock:
                self._deferred = None
        if deferred.timed:
            self.totals["host_update_seconds"] += seconds

    def settle(self) -> None:
        """Finish every host update and stop the background thread: before the store is read whole
        (a checkpoint) and when the run ends, however it ends."""
        try:
            self._join_deferred()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None

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
        self._join_deferred()
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
            try:
                offload.settle()
            finally:
                offload.discard_store_files()


def _copy_rows(layer: LayerExperts, experts: np.ndarray, buffers: Sequence[np.ndarray], slots: Iterable[int]) -> None:
    """Copy the store rows of ``experts[slot]`` into row ``slot`` of each tensor's staging buffer, row by
    row (3x numpy's fancy-index copy into fresh arrays)."""
    for tensor, buffer in zip(names.EXPERT_TENSORS, buffers):
        source = layer.weights[tensor]
        for slot in slots:
            buffer[slot] = source[experts[slot]]


def _adamw_all(store: HostExpertStore, updates: List["_LayerUpdate"], lr: float, grad_scale: float,
               settings: AdamWSettings) -> float:
    """Apply per-layer updates to the store; returns the seconds taken."""
    started = time.perf_counter()
    for layer, update in zip(store.layers, updates):
        if update.experts.size:
            adamw_rows(layer, update.experts, update.grads, lr, settings, update.grad_rows, grad_scale)
    return time.perf_counter() - started


def _every_expert(weights: Dict[str, np.ndarray], experts: np.ndarray, grads: Dict[str, np.ndarray]):
    """All experts, with zero gradients for those outside ``experts``."""
    full = {}
    for tensor, array in weights.items():
        full[tensor] = np.zeros_like(array)
        full[tensor][experts] = grads[tensor]
    return np.arange(len(next(iter(weights.values())))), full

