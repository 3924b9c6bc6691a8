"""Which layouts this build trains, and the one start line that says how a run is laid out."""

from __future__ import annotations

from mindformers_sigma.config import ConfigError, SigmaConfig
from mindformers_sigma.parallel.layouts import parameter_layouts
from mindformers_sigma.parallel.mesh import DeviceMesh


def check_trainable(config: SigmaConfig) -> None:
    """One ConfigError for a layout that is planned (``pangu-sigma plan``) but whose training is not built."""
    p = config.parallel
    if p.mode != "semi_auto_parallel":
        return
    parameter_layouts(config)  # every split divides: one error naming the parameter and the dimension
    if config.ecss.enabled:
        raise ConfigError("ecss.enabled", True, "with parallel.mode semi_auto_parallel is planned (pangu-sigma plan) "
                          "but its training is not built: the slab would be split over expert_parallel; train ECSS "
                          "stand-alone or data-parallel, or set ecss.enabled: false", config.source)
    if p.pipeline_stage > 1:
        raise ConfigError("parallel.pipeline_stage", p.pipeline_stage,
                          "> 1 is planned and its stages are set on the layers, but the pipelined train step "
                          "(micro-batches through PipelineCell) is not built; set pipeline_stage: 1 "
                          "(data parallel trains)", config.source)
    sharded = [f"{name} {value}" for name, value in (("model_parallel", p.model_parallel),
                                                      ("expert_parallel", p.expert_parallel)) if value > 1]
    if sharded or p.optimizer_shard:
        what = " and ".join(sharded + (["optimizer_shard"] if p.optimizer_shard else []))
        raise ConfigError("parallel.mode", p.mode, f"with {what} is planned and its strategies are set on the "
                          "model, but sliced checkpoints (each rank saving its part, merged with the strategy "
                          "file) are not built, so rank 0 would save only its own slices; train with "
                          "data_parallel only, or plan the layout with pangu-sigma plan", config.source)


def describe_layout(config: SigmaConfig, workers: int) -> str:
    """The start line: how this run is laid out, in words."""
    p = config.parallel
    if p.mode == "stand_alone":
        return "layout: stand-alone, one process holding the whole model (CPU runs stand-alone or data-parallel)"
    if p.mode == "data_parallel":
        return (f"layout: data parallel over {workers} workers, each a whole replica, gradients all-reduced "
                f"(CPU runs stand-alone or data-parallel)")
    mesh = DeviceMesh.of(config)
    extras = [name for name, on in (("vocabulary-parallel embedding", p.vocab_parallel),
                                    ("optimizer shard", p.optimizer_shard), ("recompute", p.recompute)) if on]
    return (f"layout: semi_auto_parallel over {mesh.devices} devices: data {mesh.data_parallel} x model "
            f"{mesh.model_parallel} x pipeline {mesh.pipeline_stages}, experts over {mesh.expert_parallel}"
            + "".join(f", {extra}" for extra in extras))
