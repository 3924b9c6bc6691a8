"""The training loop: build model and optimizer from the config, run compiled steps, log progress."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np
from mindspore import Tensor

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.context import configure_context
from mindformers_sigma.data.synthetic import synthetic_batches
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM
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


def train(config: SigmaConfig, steps: Optional[int] = None, log: Callable[[str], None] = print,
          log_interval: int = 10) -> TrainSummary:
    """Train ``config`` for ``steps`` (default ``train.steps``) and return a summary.

    Throughput excludes the first step, which includes graph compilation.
    """
    if steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
    train_cfg, model = config.train, config.model
    configure_context(config)
    network = PanGuSigmaForCausalLM(config)
    step_cell = TrainOneStepCell(network, build_optimizer(network, train_cfg), train_cfg.grad_clip_norm)
    batches = synthetic_batches(model.vocab_size, model.seq_length, train_cfg.batch_size,
                                config.moe.num_domains, model.eod_token_id, config.data.seed)
    tokens_per_step = train_cfg.batch_size * model.seq_length
    losses, step_seconds, dropped_total = [], [], 0
    for step in range(train_cfg.steps):
        tokens, domain_ids = next(batches)
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
