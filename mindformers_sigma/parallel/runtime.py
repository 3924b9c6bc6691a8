"""Which layouts this build trains, and the one start line that says how a run is laid out."""

from __future__ import annotations

from mindformers_sigma.config import ConfigError, SigmaConfig
from mindformers_sigma.parallel.layouts import parameter_layouts
from mindformers_sigma.parallel.mesh import DeviceMesh


def check_trainable(config: SigmaConfig) -> None:
    """One ConfigError for a layout that is planned (``pangu-sigma plan``) but whose training is not built."""
    p = config.parallel
    if p.mode == "stand_alone":
        return
    parameter_layouts(config)  # every split divides: one error naming the parameter and the dimension
    if p.pipeline_stage > 1:
        raise ConfigError("parallel.pipeline_stage", p.pipeline_stage,
                          "> 1 is planned, but the pipelined train step (micro-batches passed between stages) is "
                          "not built, and the 512-card layout uses none; set pipeline_stage: 1", config.source)


def describe_layout(config: SigmaConfig, workers: int) -> str:
    """The start line: how this run is laid out, in words."""
    p = config.parallel
    if p.mode == "stand_alone":
        return "layout: stand-alone, one process holding the whole model"
    mesh = DeviceMesh.of(config)
    extras = [name for name, on in (("vocabulary-parallel embedding", p.vocab_parallel and p.model_parallel > 1),
                                    ("optimizer shard", p.optimizer_shard), ("recompute", p.recompute)) if on]
    return (f"layout: hybrid_parallel over {workers} workers: data {mesh.data_parallel} x model "
            f"{mesh.model_parallel}, experts over {mesh.expert_parallel}" + "".join(f", {extra}" for extra in extras)
            + "; explicit collectives (docs/parallel.md)")
