"""The training runner: data, model, optimizer and steps from the config; logs, metrics, checkpoints.

`pangu-sigma train` and `run/train.py` call :func:`train`.  The same code runs stand-alone,
as one of several data-parallel msrun workers (CPU or Ascend), or semi-auto-parallel on
Ascend/GPU; only ``context.configure_context`` knows which.  The jobs around the loop live in
their own modules: ``resume`` (which checkpoint, same experiment?), ``run_folder`` (the
``--out`` folder), ``training_data`` (opening data), ``global_batch`` (each step's inputs),
``memory_check`` (refusing what cannot fit).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Callable, List, Optional, Tuple

import mindspore as ms
import numpy as np

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.checkpoint.description import description_fields
from mindformers_sigma.checkpoint.restore import Placement, restore
from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.context import ParallelInfo, configure_context
from mindformers_sigma.distributed.collectives import Sharding, group_name
from mindformers_sigma.parallel.gradients import GradientReducer, global_norm
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.ecss.offload import ExpertOffload, scratch_store
from mindformers_sigma.ecss.slab import slab_size, smallest_safe_slab, whole_step_slab
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.model.initial_values import initialize
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM, build_routing_tables, routing_tables_of
from mindformers_sigma.moe.expert_plan import ExpertPlanner
from mindformers_sigma.parallel.runtime import check_trainable, describe_layout
from mindformers_sigma.parallel.strategies import apply_layout
from mindformers_sigma.params import flops_per_token
from mindformers_sigma.training.global_batch import GlobalBatchReader, PrefetchingReader, prefetching
from mindformers_sigma.training.interrupts import stop_requests
from mindformers_sigma.training.loss import TrainingLoss
from mindformers_sigma.training.lr_schedule import learning_rate_at
from mindformers_sigma.training.memory_check import check_fits_in_memory, check_store_fits_on_disk
from mindformers_sigma.training.metrics import MetricsLog, domain_losses, measure_matmul_peak, plot_losses, progress_line
from mindformers_sigma.training.optimizer import build_optimizer
from mindformers_sigma.training.resume import (DATA_FINGERPRINT, check_same_experiment, check_same_tokenizer,
                                               choose_start, is_in_folder)
from mindformers_sigma.training.run_folder import ECSS_STORE, RunFolder
from mindformers_sigma.training.saving import NOT_CHECKPOINTED, checkpointed_parameters, save_step
from mindformers_sigma.training.train_step import (ApplyGradients, DynamicLossScale, ForwardBackward,
                                                   TrainOneStepCell, declare_dynamic_plan, run_step)
from mindformers_sigma.training.training_data import TrainingData, open_training_data


@dataclasses.dataclass
class TrainSummary:
    steps: int
    first_loss: float
    final_loss: float
    tokens_per_second: float
    mfu: float
    peak_flops: float
    compile_seconds: float
    compiled_graphs: int
    dropped_assignments: int
    skipped_steps: int
    resumed_from: Optional[int]
    checkpoint: Optional[str]
    peak_rss_mb: float
    device_resident_bytes: int = 0  # every MindSpore Parameter of the step: weights, moments, scale
    ecss: Optional[dict] = None  # totals of ExpertOffload (bytes moved, seconds) when ECSS is on


def build_train_step(config: SigmaConfig, frequency: Optional[np.ndarray],
                     topology: Topology = Topology()) -> TrainOneStepCell:
    """Model (this rank's slices of it), loss, optimizer and loss scale, wired into one cell that owns every
    trainable state; the gradients are summed over the ranks that share each slice."""
    if config.moe.table_balance == "uniform":
        frequency = None
    ecss = config.ecss.enabled  # experts on the host: the network holds a slab, the host updates them
    network = PanGuSigmaForCausalLM(config, build_routing_tables(config, frequency),
                                    slab_size(config) if ecss else None,
                                    Sharding(topology, config.parallel.vocab_parallel))
    initialize(network, config, topology, skip_experts=ecss)
    apply_layout(config, network)  # recompute (parallel/strategies.py)
    loss_cell = TrainingLoss(network, aux_loss_coef(config), topology.data_parallel,
                             config.train.grad_accumulation_steps, group_name(topology.data_group()))
    optimizer = build_optimizer(network, config.train, without_experts=ecss,
                                topology=topology if config.parallel.optimizer_shard else None)
    slab = [p for p in network.trainable_params() if names.is_expert_parameter(p.name)] if ecss else []
    weights = list(optimizer.parameters) + slab
    reducer = GradientReducer(weights, topology) if topology.data_parallel > 1 else None
    forward_backward = ForwardBackward(loss_cell, ms.ParameterTuple(weights), reducer)
    apply_gradients = ApplyGradients(optimizer, DynamicLossScale(config.train), config.train.grad_clip_norm, slab,
                                     global_norm(weights, topology, config.parallel.vocab_parallel))
    return TrainOneStepCell(forward_backward, apply_gradients)


def device_resident_bytes(step_cell: TrainOneStepCell) -> int:
    return sum(p.nbytes for p in step_cell.get_parameters())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (on CPU the model's memory is host memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def aux_loss_coef(config: SigmaConfig) -> float:
    """Weight of the load-balancing loss: learned routers only (RRE has nothing to balance)."""
    return config.moe.aux_loss_coef if config.moe.learned_gate else 0.0


def expert_planner(config: SigmaConfig, step_cell: TrainOneStepCell,
                   topology: Topology = Topology()) -> Optional[ExpertPlanner]:
    """Host-planned, dropless RRE dispatch (of this rank's experts) unless the config caps capacity itself."""
    if not config.moe.table_routed or config.moe.capacity_factor is not None or config.model.sparse_layers == 0:
        return None
    return ExpertPlanner(list(routing_tables_of(step_cell).values()), config.moe.num_experts,
                         topology.expert_range(config.moe.num_experts))


def print_now(line: str) -> None:
    """print, flushed: under msrun stdout is a log file, and a killed rank's last lines must be in it."""
    print(line, flush=True)


def build_or_restore(config: SigmaConfig, data: TrainingData, topology: Topology,
                     info: Optional[ckpt.CheckpointInfo], allow_config_change: bool, say: Callable[[str], None],
                     folder: Optional[RunFolder] = None
                     ) -> Tuple[TrainOneStepCell, Optional[ExpertPlanner], Optional[ExpertOffload]]:
    """The train step, with the checkpoint's state when resuming, its RRE dispatch planner and,
    with ECSS, the host side of the experts.

    The planner reads the routing tables from the built (and restored) cell, so a resumed run
    plans dispatch with the tables it really routes with, not the config's.
    """
    step_cell = build_train_step(config, data.token_frequency, topology)
    offload = None
    if config.ecss.enabled:
        store = os.path.join(folder.path, ECSS_STORE, f"rank_{topology.rank}") if folder else None  # each its own
        offload = ExpertOffload.build(config, step_cell.apply_gradients.host_updated,
                                      routing_tables_of(step_cell), store, topology)
    if info is not None:
        check_same_experiment(info, config, data.fingerprint, allow_config_change, say)
        restore(step_cell, info, NOT_CHECKPOINTED, offload.host_arrays() if offload else None,
                Placement(topology, config.parallel.vocab_parallel))
        say(f"resume: continuing from step {info.step} ({info.weights_path})")
    if offload is not None:
        offload.device_resident_bytes = device_resident_bytes(step_cell)
        safe, whole = smallest_safe_slab(config), whole_step_slab(config)
        say(f"ecss: {offload.host_resident_bytes / 2 ** 20:.1f} MiB of experts, moments and routing tables on "
            f"the host ({config.ecss.host_store}), a slab of {offload.slab_experts} experts per sparse layer on the "
            f"device" + ("" if offload.slab_experts >= whole else
                         f"; reloaded between micro-batches when a step needs more (whole step: {whole})") +
            ("" if offload.slab_experts >= safe else
             f"; below the safe {safe}: a micro-batch needing more stops the run"))
    planner = expert_planner(config, step_cell, topology)
    if planner is not None:
        rows = config.train.batch_size // (topology.data_parallel * config.train.grad_accumulation_steps)
        declare_dynamic_plan(step_cell, rows, config.model.seq_length, config.model.sparse_layers,
                             config.model.dropout_rate > 0)
    return step_cell, planner, offload


def train(config: SigmaConfig, steps: Optional[int] = None, out_dir: Optional[str] = None,
          resume: Optional[str] = None, overwrite: bool = False, allow_config_change: bool = False,
          log: Callable[[str], None] = print_now) -> TrainSummary:
    """Train for ``steps`` (default ``train.steps``), checkpointing into ``out_dir`` if given.

    ``resume``: None (``out_dir`` must then be unused, or ``overwrite``), ``"auto"`` (the newest
    usable checkpoint of ``out_dir``) or a checkpoint path; see ``training/resume.py``.
    """
    if steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
    train_cfg = config.train
    check_trainable(config)
    notes: List[str] = []
    info = choose_start(out_dir, resume, overwrite, notes.append)  # read-only: every rank decides alike
    if info is not None and info.step >= train_cfg.steps:
        raise DataError(f"nothing to train: the checkpoint is already at step {info.step} of {train_cfg.steps}; "
                        f"raise --steps")
    parallel: ParallelInfo = configure_context(config)
    say = log if parallel.is_main else (lambda line: None)
    say(describe_layout(config, parallel.group_size))
    if parallel.group_size > 1:  # each rank's own log says where it sits
        log(parallel.topology.describe(config.moe.num_experts))
    for note in notes:
        say(note)
    data_parallel = parallel.topology.data_parallel
    check_fits_in_memory(config, train_cfg.batch_size // (data_parallel * train_cfg.grad_accumulation_steps),
                         parallel.group_size if config.context.device_target == "CPU" else 1)
    if out_dir:
        check_store_fits_on_disk(config, out_dir, parallel.group_size if config.context.device_target == "CPU" else 1)
    data = open_training_data(config, info.meta.get("domains") if info is not None else None)
    if info is not None:
        check_same_tokenizer(info, data.tokenizer.model_bytes if data.tokenizer is not None else None)
    folder = RunFolder(out_dir, parallel.is_main) if out_dir else None
    try:
        return _train_in(config, data, parallel, info, folder, overwrite, allow_config_change, say)
    except BaseException:
        if folder is not None:
            folder.discard_if_unused()
        raise


def _train_in(config: SigmaConfig, data: TrainingData, parallel: ParallelInfo, info: Optional[ckpt.CheckpointInfo],
              folder: Optional[RunFolder], overwrite: bool, allow_config_change: bool,
              say: Callable[[str], None]) -> TrainSummary:
    """The part of :func:`train` that runs with the run folder open."""
    train_cfg, model = config.train, config.model
    topology = parallel.topology
    parts = topology.data_parallel * train_cfg.grad_accumulation_steps
    step_cell, planner, offload = build_or_restore(config, data, topology, info, allow_config_change, say, folder)
    if folder is not None and parallel.is_main and overwrite:  # only once the resume is known to be sound
        continued_here = info is not None and is_in_folder(info.weights_path, folder.checkpoints)
        removed = folder.remove_outputs(newer_than=info.step if continued_here else None)
        if removed:
            say(f"--overwrite: removed {len(removed)} output file(s) of the previous run in {folder.path}")
    optimizer_step = step_cell.apply_gradients.optimizer.global_step  # skipped (overflow) steps do not advance it
    start_step, position = (info.step, info.data_position) if info else (0, 0)
    reader = GlobalBatchReader(data.source, train_cfg.batch_size, topology.data_parallel, topology.data_index,
                               train_cfg.grad_accumulation_steps,
                               model.eod_token_id, planner, config.context.seed, model.dropout_rate > 0,
                               offload.stage if offload else None, topology.expert_parallel)
    peak = train_cfg.peak_flops or measure_matmul_peak()
    # what each checkpoint's sidecar says about the run (training/description.py)
    description = description_fields(config, data.domain_names, data.tokenizer) if folder and parallel.is_main \
        else {}
    flops_token = flops_per_token(config)
    tokens_per_step = train_cfg.batch_size * model.seq_length
    metrics = MetricsLog(folder.metrics if folder and parallel.is_main else None, start_step, say)
    say(f"training {train_cfg.steps} steps from step {start_step}: global batch {train_cfg.batch_size} x "
        f"{model.seq_length} tokens on {parallel.group_size} worker(s); {flops_token / 1e6:.1f} MFLOP/token, "
        f"peak {peak / 1e9:.1f} GFLOP/s per worker")

    # Steps that meet a new input shape (in practice only the first) compile a graph;
    # their time is reported as compile time, not as throughput.
    losses, run_seconds, compile_seconds, compiled_graph_keys = [], [], [], set()
    dropped_total, skipped, saved = 0, 0, None
    with scratch_store(offload), stop_requests() as stop, \
            prefetching(reader, bool(offload) and config.ecss.prefetch) as reader:
        for step in range(start_step, train_cfg.steps):
            stop.arm()  # again each step: MindSpore replaces the handlers while a graph runs
            started = time.perf_counter()  # a step's time includes reading and planning (and ECSS's loading)
            batch = reader.read(step, position)
            position = batch.next_position
            compiling = batch.graph_key not in compiled_graph_keys
            compiled_graph_keys.add(batch.graph_key)
            updates_before = int(optimizer_step.asnumpy()) if offload else 0  # the host uses the same rate
            reloads = offload.begin_step() if offload else None  # None: the slab is loaded for the whole step
            if offload and isinstance(reader, PrefetchingReader) and step + 1 < train_cfg.steps:
                reader.prefetch(step + 1, position)  # staged while this step runs
            result = run_step(step_cell, batch.micro_batches, batch.token_total, aux_loss_coef(config), parts,
                              reloads)
            if offload:
                offload.update(result.host_grads, result.finite, result.clip_factor,
                               learning_rate_at(updates_before, train_cfg),
                               timed=not compiling)
            (compile_seconds if compiling else run_seconds).append(time.perf_counter() - started)
            losses.append(result.loss)
            dropped_total += result.dropped
            skipped += int(not result.finite)
            timed = run_seconds[-train_cfg.log_interval:] or compile_seconds[-1:]
            tokens_per_second = tokens_per_step / float(np.mean(timed))
            record = {
                "step": step + 1, "loss": result.loss,
                "domain_loss": domain_losses(result.nll, result.counted, data.domain_names),
                # the rate last applied (overflow-skipped steps do not advance the optimizer's step)
                "lr": learning_rate_at(max(0, int(optimizer_step.asnumpy()) - 1), train_cfg),
                "loss_scale": result.loss_scale, "finite": result.finite,
                "grad_norm": result.grad_norm if result.finite else None,  # before clipping
                "dropped": result.dropped, "tokens_per_second": tokens_per_second,
                "mfu": tokens_per_second * flops_token / (peak * parallel.group_size),
                "eta_seconds": (float(np.mean(run_seconds[-train_cfg.log_interval:])) * (train_cfg.steps - step - 1)
                                if run_seconds else None),
                "data_position": position,
                **(offload.last if offload else {}),
            }
            metrics.write(record)
            if step == start_step or (step + 1) % train_cfg.log_interval == 0 or step + 1 == train_cfg.steps:
                say(progress_line(record, train_cfg.steps, data.domain_names))
            due = (step + 1) % train_cfg.checkpoint_interval == 0 or step + 1 == train_cfg.steps
            # Every rank stops after the same step (one that stopped alone would leave the others
            # waiting in the next step's all-reduce), and they save that step.
            stopping = parallel.any_rank(stop.signum is not None)
            if folder and (due or stopping):
                meta = {"data_position": position,
                        "loss_scale": float(step_cell.apply_gradients.loss_scale.scale.asnumpy()),
                        DATA_FINGERPRINT: data.fingerprint, **description}
                parameters = checkpointed_parameters(step_cell)
                if offload:
                    parameters = offload.checkpoint_parameters(parameters)
                saved = save_step(folder.checkpoints, step + 1, parameters, meta, config, parallel) or saved
            if stopping:
                stop.raise_now(f"after step {step + 1}: " + (
                    f"checkpoint saved in {folder.checkpoints}; continue with --resume auto" if folder
                    else "nothing saved (no --out)"))

    timed = run_seconds or compile_seconds
    tail = max(1, min(10, len(losses) // 5))
    tokens_per_second = tokens_per_step * len(timed) / float(np.sum(timed))
    summary = TrainSummary(
        steps=train_cfg.steps, first_loss=losses[0], final_loss=float(np.mean(losses[-tail:])),
        tokens_per_second=tokens_per_second, mfu=tokens_per_second * flops_token / (peak * parallel.group_size),
        peak_flops=peak, compile_seconds=float(np.sum(compile_seconds)), compiled_graphs=len(compiled_graph_keys),
        dropped_assignments=dropped_total,
        skipped_steps=skipped, resumed_from=info.step if info else None, checkpoint=saved,
        peak_rss_mb=peak_rss_mb(), device_resident_bytes=device_resident_bytes(step_cell),
        ecss=dict(offload.totals, host_resident_bytes=offload.host_resident_bytes,
                  **offload.summed_totals(parallel.sum)) if offload else None)
    if folder and parallel.is_main and plot_losses(folder.metrics, folder.loss_plot):
        say(f"loss curve: {folder.loss_plot}")
    return summary
