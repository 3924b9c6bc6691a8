"""The human-readable report of ``pangu-sigma plan``."""

from __future__ import annotations

from typing import List

from mindformers_sigma.parallel.hardware import GIB
from mindformers_sigma.parallel.planner import LayoutPlan


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def format_plan(plan: LayoutPlan) -> str:
    mesh, config = plan.mesh, plan.config
    lines: List[str] = [
        f"{config.source}: {mesh.devices} devices = data {mesh.data_parallel} x model {mesh.model_parallel} x "
        f"pipeline {mesh.pipeline_stages}; experts over {mesh.expert_parallel}; "
        f"{config.parallel.micro_batch_num} micro-batch(es) x {config.train.grad_accumulation_steps} accumulation; "
        f"ECSS {'on' if config.ecss.enabled else 'off'}",
        "",
        f"{'parameter':64} {'shape':>20} {'dev_matrix':>14} {'tensor_map':>12} {'shard':>20} opt",
    ]
    for layout in plan.layouts:
        if layout.kind == "optimizer":
            continue  # AdamW moments share their weight's layout
        lines.append(f"{layout.name:64} {str(list(layout.shape)):>20} {str(list(layout.dev_matrix)):>14} "
                     f"{str(list(layout.tensor_map)):>12} {str(list(layout.shard_shape)):>20} "
                     f"{layout.opt_shard_size or '-'}")
    lines.append("(AdamW moments adam_m./adam_v. share their weight's layout)")
    lines.append("")
    for stage in plan.stages:
        lines.append(f"stage {stage.stage}: layers {stage.layers[0]}-{stage.layers[-1]} ({stage.sparse_layers} sparse), "
                     f"{stage.in_flight} micro-batch(es) in flight, per device {_gib(stage.total).strip()}")
        for name, size in sorted(stage.bytes.items(), key=lambda item: -item[1]):
            if size:
                lines.append(f"    {name:44} {_gib(size)}")
    lines += [
        "",
        f"per device {_gib(plan.per_device_bytes).strip()} of {_gib(plan.hbm_budget_bytes).strip()} "
        f"({'fits' if plan.per_device_bytes <= plan.hbm_budget_bytes else 'DOES NOT FIT'}); "
        f"without ECSS {_gib(plan.per_device_bytes_without_ecss).strip()}",
        f"host memory per server {_gib(plan.host_bytes_per_server).strip()} of "
        f"{_gib(plan.assumptions['host_bytes_per_server'].value).strip()}",
        "",
        "communication per step and device:",
    ]
    for name, size in plan.communication.items():
        lines.append(f"    {name:44} {_gib(size)}   {plan.seconds.get(name, 0.0):7.2f} s exposed")
    lines += [
        f"step: compute {plan.seconds['compute']:.2f} s, pipeline bubble {plan.seconds['pipeline_bubble']:.2f} s "
        f"({plan.bubble:.1%})" + (f", host AdamW {plan.seconds['ecss_host_adamw']:.2f} s"
                                  if "ecss_host_adamw" in plan.seconds else "")
        + f"; {plan.step_seconds:.2f} s in all",
        f"roofline estimate {plan.tokens_per_s:,.0f} tokens/s (PanGu-Σ, 1.085T on 512 Ascend 910, measured "
        f"{plan.assumptions['paper_tokens_per_s'].value:,.0f})",
        "",
        "assumptions:",
    ]
    for name, assumption in plan.assumptions.items():
        lines.append(f"    {name} = {assumption.value:g} {assumption.unit}: {assumption.source}")
    return "\n".join(lines)
