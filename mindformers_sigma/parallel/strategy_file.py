"""Strategy files in MindSpore's JSON format, written from the config's layouts.

``mindspore.parallel.build_searched_strategy``, ``rank_list_for_transform`` and
``transform_checkpoints`` read them as they read the files MindSpore saves itself
(``strategy_ckpt_save_file``).  With pipeline stages the file is the merged form
(``merge_pipeline_strategys``): every parameter key is ``"<stage>-<name>"``, once per stage that
holds it, and device matrices cover one stage.  A ``mindformers_sigma`` field, which MindSpore
does not read, says which config and project version made the file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from mindformers_sigma import __version__
from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.config import SigmaConfig, config_to_dict
from mindformers_sigma.parallel.layouts import ParameterLayout, parameter_layouts
from mindformers_sigma.parallel.mesh import DeviceMesh
from mindformers_sigma.parallel.strategies import op_strategies

PRODUCER_FIELD = "mindformers_sigma"


def _layout_item(layout: ParameterLayout) -> dict:
    return {"dev_matrix": list(layout.dev_matrix), "tensor_map": list(layout.tensor_map),
            "param_split_shape": [], "indices_offset": [], "field": 0,
            "opt_weight_shard_step": layout.opt_shard_step, "opt_weight_shard_size": layout.opt_shard_size}


def strategy_document(config: SigmaConfig, config_name: str, overrides: Sequence[str] = ()) -> dict:
    """The strategy file's content; ``config_name`` and the ``--set`` overrides are recorded as its maker."""
    mesh = DeviceMesh.of(config)
    staged = mesh.pipeline_stages > 1
    layouts = {}
    for layout in parameter_layouts(config):
        for stage in layout.stages:
            layouts[f"{stage}-{layout.name}" if staged else layout.name] = _layout_item(layout)
    ops = {f"{op.stage}-{key}" if staged else key: {"stage": op.stage, "parallel_strategy": {
        "dim": [{"dim": list(part)} for part in op.in_strategy]}} for key, op in op_strategies(config).items()}
    config_text = json.dumps(config_to_dict(config), sort_keys=True)
    producer = {"config": config_name, "overrides": list(overrides), "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
                "version": __version__, "devices": mesh.devices,
                "layout": {"data_parallel": mesh.data_parallel, "model_parallel": mesh.model_parallel,
                           "pipeline_stage": mesh.pipeline_stages, "expert_parallel": mesh.expert_parallel,
                           "optimizer_shard": config.parallel.optimizer_shard,
                           "vocab_parallel": config.parallel.vocab_parallel}}
    # a merged pipeline file says 1, as merge_pipeline_strategys writes; one stage's file its stage (0)
    return {"current_stage": 1 if staged else 0, "parallel_strategy_item": ops, "parallel_layout_item": layouts,
            PRODUCER_FIELD: producer}


def write_strategy_file(config: SigmaConfig, config_name: str, path: str, overrides: Sequence[str] = ()) -> None:
    text = json.dumps(strategy_document(config, config_name, overrides), indent=1, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode())
