"""The training runner: data, model, optimizer and steps from the config; logs, metrics, checkpoints.

`pangu-sigma train` and `run/train.py` call :func:`train`.  The same code runs stand-alone,
as one of several data-parallel msrun workers (CPU or Ascend), or semi-auto-parallel on
Ascend/GPU; only ``context.configure_context`` knows which.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindformers_sigma.config import SigmaConfig, config_to_dict
from mindformers_sigma.context import ParallelInfo, configure_context
from mindformers_sigma.data.dataset import MixedCorpusSource, PreparedCorpus, SampleSchedule, batches
from mindformers_sigma.errors import DataError
from mindformers_sigma.data.synthetic import SyntheticSource
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM, build_routing_tables
from mindformers_sigma.moe.capacity_planner import ExpertCapacityPlanner, routing_tables_of
from mindformers_sigma.training import checkpoint as ckpt
from mindformers_sigma.training.loss import TrainingLoss
from mindformers_sigma.training.lr_schedule import learning_rate_at
from mindformers_sigma.training.metrics import (MetricsLog, domain_losses, flops_per_token, measure_matmul_peak,
                                                plot_losses, progress_line)
from mindformers_sigma.training.optimizer import build_optimizer
from mindformers_sigma.training.train_step import ApplyGradients, DynamicLossScale, ForwardBackward, TrainOneStepCell


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


def open_training_data(config: SigmaConfig) -> Tuple[object, List[str], Optional[np.ndarray]]:
    """The sample source, its domain names and, for real data, the token frequencies."""
    model, data = config.model, config.data
    if data.source == "synthetic":
        source = SyntheticSource(model.vocab_size, model.seq_length, config.moe.num_domains,
                                 model.eod_token_id, data.seed)
        return source, [f"domain{i}" for i in range(config.moe.num_domains)], None
    corpus = PreparedCorpus(data.path)
    checks = [
        (corpus.vocab_size <= model.vocab_size, "model.vocab_size", model.vocab_size,
         f"is smaller than the tokenizer vocabulary of {data.path} ({corpus.vocab_size})"),
        (corpus.sample_length == model.seq_length + 1, "model.seq_length", model.seq_length,
         f"does not match the samples of {data.path} (prepared with --seq-length {corpus.sample_length - 1})"),
        (len(corpus.names) <= config.moe.num_domains, "moe.num_domains", config.moe.num_domains,
         f"is smaller than the {len(corpus.names)} domains of {data.path}"),
        (corpus.manifest["eod_token_id"] == model.eod_token_id, "model.eod_token_id", model.eod_token_id,
         f"differs from the tokenizer's EOD id {corpus.manifest['eod_token_id']}"),
    ]
    for ok, field, value, rule in checks:
        if not ok:
            raise DataError(f"{config.source}: {field} = {value!r}: {rule}")
    weights = corpus.mixing_weights(data.domain_weights, config.source)
    schedule = SampleSchedule([s.shape[0] for s in corpus.samples], weights, data.seed)
    frequency = corpus.token_frequency(config.moe.num_domains, model.vocab_size)
    names = corpus.names + [f"domain{i}" for i in range(len(corpus.names), config.moe.num_domains)]
    return MixedCorpusSource(corpus, schedule), names, frequency


def build_train_step(config: SigmaConfig, frequency: Optional[np.ndarray], data_parallel: int) -> TrainOneStepCell:
    """Model, loss, optimizer and loss scale, wired into one cell that owns every trainable state."""
    if config.moe.table_balance == "uniform":
        frequency = None
    network = PanGuSigmaForCausalLM(config, build_routing_tables(config, frequency))
    if config.parallel.recompute:  # keep only layer inputs; recompute activations in the backward pass
        for layer in (*network.backbone.layers, network.backbone.top_query_layer):
            layer.recompute()
    aux_coef = config.moe.aux_loss_coef if config.moe.router != "rre" else 0.0
    loss_cell = TrainingLoss(network, aux_coef, data_parallel)
    optimizer = build_optimizer(network, config.train)
    forward_backward = ForwardBackward(loss_cell, optimizer.parameters, data_parallel)
    apply_gradients = ApplyGradients(optimizer, DynamicLossScale(config.train), config.train.grad_clip_norm)
    return TrainOneStepCell(forward_backward, apply_gradients)


NOT_CHECKPOINTED = ("learning_rate",)


def checkpointed_parameters(step_cell: TrainOneStepCell) -> dict:
    """Everything a checkpoint holds; the LR schedule array is left out, as the config defines it."""
    return {name: param for name, param in step_cell.parameters_dict().items() if name not in NOT_CHECKPOINTED}


def capacity_planner(config: SigmaConfig, step_cell: TrainOneStepCell) -> Optional[ExpertCapacityPlanner]:
    """Exact, host-sized expert buffers for RRE unless the config caps capacity itself."""
    if config.moe.router != "rre" or config.moe.capacity_factor is not None or config.model.sparse_layers == 0:
        return None
    return ExpertCapacityPlanner(routing_tables_of(step_cell), config.moe.num_experts)


def _step_inputs(planner: Optional[ExpertCapacityPlanner], tokens: np.ndarray, domain_ids: np.ndarray,
                 source, next_position: int, parallel: ParallelInfo) -> tuple:
    """This rank's tensors, plus the expert-capacity hint agreed by all ranks (read from the global batch)."""
    inputs = (Tensor(tokens), Tensor(domain_ids))
    if planner is None:
        return inputs
    if parallel.group_size > 1:
        global_batch = tokens.shape[0] * parallel.group_size
        tokens, domain_ids = source.read(next_position - global_batch, global_batch)
    return inputs + (Tensor(planner.capacity_hint(tokens[:, :-1], domain_ids, parallel.group_size)),)


def _accumulated_step(step_cell: TrainOneStepCell, micro_inputs: List[tuple]):
    """Several forward/backward passes, gradients summed, then one update of their mean."""
    scale = step_cell.apply_gradients.loss_scale.scale * 1.0
    total_grads, totals = None, None
    for inputs in micro_inputs:
        stats, grads = step_cell.forward_backward(*inputs[:2], scale, *inputs[2:])
        total_grads = grads if total_grads is None else tuple(a + b for a, b in zip(total_grads, grads))
        totals = stats if totals is None else tuple(a + b for a, b in zip(totals, stats))
    count = len(micro_inputs)
    finite = step_cell.apply_gradients(total_grads, Tensor(float(count), ms.float32))
    loss, nll, tokens, aux, dropped = totals
    return (loss / count, nll, tokens, aux / count, dropped, finite, scale)


def _resolve_resume(resume: Optional[str], checkpoint_dir: str, log) -> Optional[ckpt.CheckpointInfo]:
    if resume is None:
        return None
    if resume == "auto":
        info = ckpt.find_resume_checkpoint(checkpoint_dir, log)
        if info is None:
            log(f"resume: no valid checkpoint in {checkpoint_dir}; starting from scratch")
        return info
    meta = os.path.splitext(resume)[0] + ".json"
    try:
        return ckpt.read_checkpoint(meta)
    except ValueError as err:
        raise DataError(f"--resume {resume}: {err}; pass a checkpoint with its .json sidecar, or auto") from None


def train(config: SigmaConfig, steps: Optional[int] = None, out_dir: Optional[str] = None,
          resume: Optional[str] = None, log: Callable[[str], None] = print) -> TrainSummary:
    """Train for ``steps`` (default ``train.steps``), checkpointing into ``out_dir`` if given."""
    if steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
    train_cfg, model = config.train, config.model
    parallel: ParallelInfo = configure_context(config)
    say = log if parallel.is_main else (lambda line: None)
    source, domain_names, frequency = open_training_data(config)
    step_cell = build_train_step(config, frequency, parallel.group_size)
    planner = capacity_planner(config, step_cell)
    optimizer_step = step_cell.apply_gradients.optimizer.global_step  # skipped (overflow) steps do not advance it

    checkpoint_dir = os.path.join(out_dir, "checkpoints") if out_dir else ""
    info = _resolve_resume(resume, checkpoint_dir, say)
    start_step, position = 0, 0
    if info is not None:
        wanted = checkpointed_parameters(step_cell)
        stored = {name: p for name, p in ckpt.load_parameters(info).items() if name not in NOT_CHECKPOINTED}
        try:
            missing, _ = ms.load_param_into_net(step_cell, stored, strict_load=True)
        except (RuntimeError, ValueError, TypeError) as err:
            raise DataError(f"--resume {info.weights_path}: does not fit this model "
                            f"({str(err).splitlines()[0][:200]}); was it written with another config?") from None
        missing = [name for name in missing if name in wanted]
        if missing:
            raise DataError(f"--resume {info.weights_path}: lacks {len(missing)} parameters of this model "
                            f"(first: {missing[0]}); was it written with another config?")
        ms.set_rng_state(Tensor(np.asarray(info.meta["rng_state"], dtype=np.uint8)))
        start_step, position = info.step, info.data_position
        say(f"resume: continuing from step {start_step} ({info.weights_path})")

    per_rank_micro = train_cfg.batch_size // (parallel.group_size * train_cfg.grad_accumulation_steps)
    stream = batches(source, per_rank_micro, position, parallel.group_size, parallel.rank)
    peak = train_cfg.peak_flops or measure_matmul_peak()
    flops_token = flops_per_token(config)
    tokens_per_step = train_cfg.batch_size * model.seq_length
    if out_dir and parallel.is_main:
        os.makedirs(out_dir, exist_ok=True)
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl") if out_dir and parallel.is_main else None, start_step)
    say(f"training {train_cfg.steps} steps from step {start_step}: global batch {train_cfg.batch_size} x "
        f"{model.seq_length} tokens on {parallel.group_size} worker(s); {flops_token / 1e6:.1f} MFLOP/token, "
        f"peak {peak / 1e9:.1f} GFLOP/s per worker")

    # Steps that meet a new input shape (the first, or a new expert capacity) compile a graph;
    # their time is reported as compile time, not as throughput.
    losses, run_seconds, compile_seconds, compiled_shapes = [], [], [], set()
    dropped_total, skipped, saved = 0, 0, None
    for step in range(start_step, train_cfg.steps):
        micro_inputs = []
        for _ in range(train_cfg.grad_accumulation_steps):
            tokens, domain_ids, position = next(stream)
            micro_inputs.append(_step_inputs(planner, tokens, domain_ids, source, position, parallel))
        shapes = tuple(tuple(t.shape) for inputs in micro_inputs for t in inputs)
        compiling = shapes not in compiled_shapes
        compiled_shapes.add(shapes)
        started = time.perf_counter()
        if train_cfg.grad_accumulation_steps == 1:
            outputs = step_cell(*micro_inputs[0])
        else:
            outputs = _accumulated_step(step_cell, micro_inputs)
        loss, nll, counted, _, dropped, finite, scale = (o.asnumpy() for o in outputs)
        (compile_seconds if compiling else run_seconds).append(time.perf_counter() - started)
        losses.append(float(loss))
        dropped_total += int(dropped)
        skipped += int(not finite)
        timed = run_seconds[-train_cfg.log_interval:] or compile_seconds[-1:]
        tokens_per_second = tokens_per_step / float(np.mean(timed))
        record = {
            "step": step + 1, "loss": float(loss), "domain_loss": domain_losses(nll, counted, domain_names),
            "lr": learning_rate_at(max(0, int(optimizer_step.asnumpy()) - 1), train_cfg),  # the rate last applied
            "loss_scale": float(scale), "finite": bool(finite),
            "dropped": int(dropped), "tokens_per_second": tokens_per_second,
            "mfu": tokens_per_second * flops_token / (peak * parallel.group_size),
            "eta_seconds": (float(np.mean(run_seconds[-train_cfg.log_interval:])) * (train_cfg.steps - step - 1)
                            if run_seconds else None),
            "data_position": position,
        }
        metrics.write(record)
        if step == start_step or (step + 1) % train_cfg.log_interval == 0 or step + 1 == train_cfg.steps:
            say(progress_line(record, train_cfg.steps, domain_names))
        if out_dir and ((step + 1) % train_cfg.checkpoint_interval == 0 or step + 1 == train_cfg.steps):
            if parallel.is_main:
                meta = {"data_position": position, "rng_state": ms.get_rng_state().asnumpy().tolist(),
                        "loss_scale": float(step_cell.apply_gradients.loss_scale.scale.asnumpy()),
                        "config": config_to_dict(config)}
                saved = ckpt.save_checkpoint(checkpoint_dir, step + 1, checkpointed_parameters(step_cell), meta,
                                             train_cfg.checkpoint_format, train_cfg.keep_checkpoints)

    if not losses:
        raise DataError(f"nothing to train: the checkpoint is already at step {start_step} of {train_cfg.steps}; "
                        f"raise --steps")
    timed = run_seconds or compile_seconds
    tail = max(1, min(10, len(losses) // 5))
    tokens_per_second = tokens_per_step * len(timed) / float(np.sum(timed))
    summary = TrainSummary(
        steps=train_cfg.steps, first_loss=losses[0], final_loss=float(np.mean(losses[-tail:])),
        tokens_per_second=tokens_per_second, mfu=tokens_per_second * flops_token / (peak * parallel.group_size),
        peak_flops=peak, compile_seconds=float(np.sum(compile_seconds)), compiled_graphs=len(compiled_shapes),
        dropped_assignments=dropped_total,
        skipped_steps=skipped, resumed_from=info.step if info else None, checkpoint=saved)
    if out_dir and parallel.is_main and plot_losses(os.path.join(out_dir, "metrics.jsonl"),
                                                    os.path.join(out_dir, "loss.png")):
        say(f"loss curve: {os.path.join(out_dir, 'loss.png')}")
    return summary
