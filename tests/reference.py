"""Independent numpy references for the model's pieces."""

from __future__ import annotations

import numpy as np


def fast_gelu(x: np.ndarray) -> np.ndarray:
    """FastGeLU as documented by MindSpore: x * sigmoid(1.702 x)."""
    return x / (1.0 + np.exp(-1.702 * x))


def expert_ffn(x: np.ndarray, w1, b1, w2, b2) -> np.ndarray:
    """One expert applied to one token vector."""
    return fast_gelu(x @ w1 + b1.reshape(-1)) @ w2 + b2.reshape(-1)


def capacity_positions(expert_choices: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-token loop: position of each (token, choice) inside its expert, first choices first."""
    num_tokens, top_k = expert_choices.shape
    filled = np.zeros(num_experts, dtype=np.int64)
    position = np.zeros_like(expert_choices)
    for choice in range(top_k):
        for token in range(num_tokens):
            expert = expert_choices[token, choice]
            position[token, choice] = filled[expert]
            filled[expert] += 1
    return position
