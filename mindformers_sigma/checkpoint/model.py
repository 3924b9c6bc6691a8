"""A checkpoint's model, for the commands that use a trained PanGu-Σ rather than train it.

Reads the model's weights (``backbone.*``: the routing tables included, the optimizer state
left out) of a self-describing checkpoint, builds the network around them, and writes the
weights-only checkpoints that ``inherit``, ``extract`` and ``add-domain`` produce.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional

import mindspore as ms
import numpy as np

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM
from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.checkpoint.description import Description, description_fields
from mindformers_sigma.tokenizer.kinds import AnyTokenizer


def require_sparse_parameters(weights: Mapping[str, object], config: SigmaConfig, source: str) -> None:
    """The sparse layers' routing tables and experts, which building, extracting and growing a model
    index by name, must all be in ``weights``; the first missing one is one line naming it."""
    for layer in names.sparse_layer_prefixes(config.model):
        tables = (names.routing_table_name(layer),) if config.moe.table_routed else ()
        missing = next((name for name in tables + names.expert_tensor_names(layer) if name not in weights), None)
        if missing is not None:
            raise DataError(f"{source}: lacks parameter {missing}, of a sparse layer of its config; was it written "
                            f"with another config?")


def model_weights(description: Description) -> Dict[str, np.ndarray]:
    """Every model parameter of the checkpoint as numpy arrays (optimizer state skipped unread); the
    sparse layers' routing tables and experts, which the lifecycle commands cut and grow, must be there."""
    stored = ckpt.read_tensors(description.info, names.is_model_parameter)
    require_sparse_parameters(stored, description.config, description.info.weights_path)
    return stored


def inference_config(config: SigmaConfig) -> SigmaConfig:
    """The config a loaded model runs with: no dropout, no token dropping (capacity is a training
    trade-off; a served model computes every token), stand-alone."""
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, dropout_rate=0.0),
        moe=dataclasses.replace(config.moe, capacity_factor=None),
        parallel=dataclasses.replace(config.parallel, mode="stand_alone", device_num=1, data_parallel=1,
                                     model_parallel=1, pipeline_stage=1, expert_parallel=1, micro_batch_num=1),
        ecss=dataclasses.replace(config.ecss, enabled=False),
    )


def build_model(config: SigmaConfig, weights: Dict[str, np.ndarray], source: str) -> PanGuSigmaForCausalLM:
    """The network of ``config`` holding ``weights``; a missing or misshapen parameter is one line naming it
    and both shapes."""
    require_sparse_parameters(weights, config, source)
    tables = [names.routing_table_name(layer) for layer in names.sparse_layer_prefixes(config.model)] \
        if config.moe.table_routed else []
    network = PanGuSigmaForCausalLM(inference_config(config), [weights[name] for name in tables] or None)
    for name, parameter in network.parameters_and_names():
        if name not in weights:
            raise DataError(f"{source}: lacks parameter {name} {tuple(parameter.shape)} of the model its config "
                            f"describes; was it written with another config?")
        value = weights[name]
        if tuple(value.shape) != tuple(parameter.shape):
            raise DataError(f"{source}: {name} has shape {tuple(value.shape)}, the config's model needs "
                            f"{tuple(parameter.shape)}; was it written with another config?")
        parameter.set_data(ms.Tensor(value.astype(ms.dtype_to_nptype(parameter.dtype))))
    network.set_train(False)
    return network


def load_model(description: Description) -> PanGuSigmaForCausalLM:
    """The checkpoint's trained network, ready for inference."""
    return build_model(description.config, model_weights(description), description.info.weights_path)


def write_model(path: str, weights: Dict[str, np.ndarray], config: SigmaConfig, domains: List[str],
                tokenizer: Optional[AnyTokenizer], made_by: str) -> None:
    """A weights-only, self-describing checkpoint at ``path`` (``NAME.ckpt`` or ``NAME.safetensors`` and
    ``NAME.json``), written atomically; ``made_by`` records the command that made it."""
    ckpt.save_weights_only(path, weights, dict(description_fields(config, domains, tokenizer),
                                               made_by=made_by))
