"""The experts' AdamW update, on the host, for the experts a step touched.

The same rule as the device optimizer (``training/optimizer.py``: MindSpore's AdamWeightDecay,
no bias correction), in float32 numpy on the touched rows of each ``[E, ...]`` array:
``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``; ``p -= lr (m / (sqrt(v) + eps) + wd p)``.

Lazy semantics: an expert no step touched keeps its weights and moments unchanged; dense AdamW
would decay its moments and weights every step.  With no bias correction the update depends on
no step count, so none is kept per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from mindformers_sigma.ecss.host_store import EXPERT_TENSORS, LayerExperts


@dataclass(frozen=True)
class AdamWSettings:
    beta1: float
    beta2: float
    eps: float  # train.expert_eps
    weight_decay: Dict[str, float]  # per expert tensor: matrices decay, biases do not


def adamw_rows(layer: LayerExperts, experts: np.ndarray, grads: Dict[str, np.ndarray], lr: float,
               settings: AdamWSettings) -> None:
    """Update ``experts`` (rows of every tensor) of one layer in place with their gradients."""
    f32 = np.float32
    beta1, beta2, eps, rate = f32(settings.beta1), f32(settings.beta2), f32(settings.eps), f32(lr)
    for tensor in EXPERT_TENSORS:
        grad = grads[tensor].astype(f32, copy=False)
        param, moment1, moment2 = layer.weights[tensor][experts], layer.moment1[tensor][experts], \
            layer.moment2[tensor][experts]
        moment1 = beta1 * moment1 + (f32(1) - beta1) * grad
        moment2 = beta2 * moment2 + (f32(1) - beta2) * grad * grad
        update = moment1 / (np.sqrt(moment2) + eps) + f32(settings.weight_decay[tensor]) * param
        layer.weights[tensor][experts] = param - rate * update
        layer.moment1[tensor][experts] = moment1
        layer.moment2[tensor][experts] = moment2
