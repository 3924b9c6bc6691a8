"""AdamWeightDecay with PanGu-α's parameter groups: no decay on LayerNorm, biases or the routing table."""

from __future__ import annotations

from mindspore import nn

from mindformers_sigma.config import TrainConfig
from mindformers_sigma.training.lr_schedule import learning_rates


def takes_weight_decay(parameter_name: str) -> bool:
    """Matrices and embeddings decay; LayerNorm gains/shifts and biases do not."""
    leaf = parameter_name.rsplit(".", 1)[-1]
    return leaf not in ("gamma", "beta", "bias", "b1", "b2")


def build_optimizer(network: nn.Cell, train: TrainConfig) -> nn.Optimizer:
    """Optimizer over the network's trainable parameters (the routing table is not trainable)."""
    params = network.trainable_params()
    decay = [p for p in params if takes_weight_decay(p.name)]
    no_decay = [p for p in params if not takes_weight_decay(p.name)]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"order_params": params},
    ]
    return nn.AdamWeightDecay(groups, learning_rate=learning_rates(train), beta1=train.beta1,
                              beta2=train.beta2, eps=train.eps)
