"""Learning-rate schedule: linear warmup, then cosine decay to the minimum."""

from __future__ import annotations

import math

from mindformers_sigma.config import TrainConfig


def learning_rate_at(step: int, train: TrainConfig) -> float:
    """Rate for 0-based ``step``: ``lr * (step+1)/warmup`` in warmup, then cosine to ``min_learning_rate``."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_learning_rate + (train.learning_rate - train.min_learning_rate) * cosine


def learning_rates(train: TrainConfig) -> list:
    """The whole schedule, one value per step, as MindSpore optimizers take a dynamic rate."""
    return [learning_rate_at(step, train) for step in range(train.steps)]
