"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Pure numpy on the host, vectorised over the batch, with an explicit ``numpy.random.Generator``,
so a seed reproduces a run exactly whichever decoder (cached or not) produced the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """``greedy``, or draw from softmax(logits / temperature) cut to the ``top_k`` most likely tokens
    (0: all) and then to the smallest set whose probability reaches ``top_p``."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def sampling_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """logits [B, V] -> the float64 distribution [B, V] that :func:`next_tokens` draws from."""
    scaled = logits.astype(np.float64) / sampling.temperature
    vocab = scaled.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = np.partition(scaled, vocab - sampling.top_k, axis=-1)[:, vocab - sampling.top_k, None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        ranked = np.take_along_axis(probs, order, -1)
        before = np.cumsum(ranked, -1) - ranked  # mass of the more likely tokens
        keep_ranked = before < sampling.top_p  # the most likely token is always kept
        keep = np.zeros_like(keep_ranked)
        np.put_along_axis(keep, order, keep_ranked, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> one token id per row (int64).  Sampling draws exactly one uniform per row."""
    if sampling.greedy:
        return np.argmax(logits, axis=-1)
    probs = sampling_probabilities(logits, sampling)
    cdf = np.cumsum(probs, -1)
    draws = rng.random(logits.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draws).sum(-1), logits.shape[-1] - 1)
