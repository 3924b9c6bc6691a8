"""The training loop: build model and optimizer from the config, run compiled steps, log progress."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
from mindspore import Tensor

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.context import configure_context
from mindformers_sigma.data.dataset import PreparedCorpus, SampleSchedule, batches
from mindformers_sigma.data.prepare import DataError
from mindformers_sigma.data.synthetic import synthetic_batches
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM, build_routing_tables
from mindformers_sigma.training.lr_schedule import learning_rate_at
from mindformers_sigma.training.optimizer import build_optimizer
from mindformers_sigma.training.train_step import TrainOneStepCell


@dataclasses.dataclass
class TrainSummary:
    steps: int
    first_loss: float
    final_loss: float
    tokens_per_second: float
    compile_seconds: float
    dropped_assignments: int


def open_training_data(config: SigmaConfig) -> Tuple[Iterator, Optional[np.ndarray]]:
    """Batches ``(tokens, domain_ids, next_position)`` and, for real data, the token frequencies."""
    model, data = config.model, config.data
    if data.source == "synthetic":
        stream = synthetic_batches(model.vocab_size, model.seq_length, config.train.batch_size,
                                   config.moe.num_domains, model.eod_token_id, data.seed)
        return ((tokens, domains, None) for tokens, domains in stream), None
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
    return batches(corpus, schedule, config.train.batch_size), frequency


def train(config: SigmaConfig, steps: Optional[int] = None, log: Callable[[str], None] = print,
          log_interval: int = 10) -> TrainSummary:
    """Train ``config`` for ``steps`` (default ``train.steps``) and return a summary.

    Throughput excludes the first step, which includes graph compilation.
    """
    if steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
    train_cfg, model = config.train, config.model
    configure_context(config)
    stream, frequency = open_training_data(config)
    if config.moe.table_balance == "uniform":
        frequency = None
    network = PanGuSigmaForCausalLM(config, build_routing_tables(config, frequency))
    step_cell = TrainOneStepCell(network, build_optimizer(network, train_cfg), train_cfg.grad_clip_norm)
    tokens_per_step = train_cfg.batch_size * model.seq_length
    losses, step_seconds, dropped_total = [], [], 0
    for step in range(train_cfg.steps):
        tokens, domain_ids, _ = next(stream)
        start = time.perf_counter()
        loss, lm_loss, _, dropped = step_cell(Tensor(tokens), Tensor(domain_ids))
        loss_value = float(loss.asnumpy())
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss_value)
        dropped_total += int(dropped.asnumpy())
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        if step % log_interval == 0 or step == train_cfg.steps - 1:
            recent = step_seconds[1:][-log_interval:] or step_seconds
            log(f"step {step + 1:>5}/{train_cfg.steps}  loss {loss_value:.4f}  lm {float(lm_loss.asnumpy()):.4f}"
                f"  lr {learning_rate_at(step, train_cfg):.3e}  dropped {int(dropped.asnumpy())}"
                f"  tokens/s {tokens_per_step / np.mean(recent):,.0f}")
    timed = step_seconds[1:] or step_seconds
    tail = max(1, min(10, len(losses) // 5))
    return TrainSummary(
        steps=train_cfg.steps,
        first_loss=losses[0],
        final_loss=float(np.mean(losses[-tail:])),
        tokens_per_second=tokens_per_step * len(timed) / float(np.sum(timed)),
        compile_seconds=step_seconds[0],
        dropped_assignments=dropped_total,
    )
