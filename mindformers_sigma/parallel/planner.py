"""Per-device memory, per-step communication and a roofline tokens/s of a layout, from the config alone.

Every figure is an estimate from stated constants (``hardware.py``); the parameter bytes are
exact (they come from the same layouts as the strategy files).  The worst pipeline stage binds:
``per_device_bytes`` is its total.  Formulas:

* weights are fp32 masters (sharded by the parallel optimizer where it applies), gradients fp32
  at the model/expert-parallel slice (accumulated over micro-batches before the optimizer's
  reduce-scatter), AdamW moments fp32 at the optimizer's shard;
* activations per layer and micro-batch follow Korthikanti et al. 2022 (``s b h (10 + 24/t +
  5 a s / (h t))`` bytes at 2-byte activations, t = model parallel); recompute keeps only each
  layer's input plus one layer's working set; a sparse layer adds its dispatch and combine
  buffers; 1F1B keeps ``pipeline_stage - stage`` micro-batches in flight on a stage;
* the ECSS slab holds fp32 weights and gradients of the slots; its size is the experts the
  in-flight micro-batches of every data-parallel rank can activate (their gradients are reduced
  slot by slot), split over expert_parallel;
* collectives are ring collectives (``2 (n-1)/n`` of the buffer for AllReduce, ``(n-1)/n`` for
  ReduceScatter, AllGather and AlltoAll).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.ecss.host_adamw import FUSED_BYTES_PER_PARAMETER
from mindformers_sigma.ecss.slab import whole_step_slab
from mindformers_sigma.parallel.collective_volume import collective_buffers
from mindformers_sigma.errors import DataError
from mindformers_sigma.model import names
from mindformers_sigma.parallel.hardware import GIB, Assumption, ascend_910_cluster
from mindformers_sigma.parallel.layouts import ParameterLayout, parameter_layouts
from mindformers_sigma.parallel.mesh import DeviceMesh, micro_batch_rows
from mindformers_sigma.params import count_parameters, flops_per_token


@dataclass
class StagePlan:
    stage: int
    layers: List[int]
    sparse_layers: int
    in_flight: int
    bytes: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _activation_bytes(config: SigmaConfig) -> int:
    return 2 if config.model.compute_dtype == "float16" else 4


def _layer_working_set(config: SigmaConfig, rows: int, sparse: bool) -> float:
    """One layer's activations for one micro-batch, kept for the backward pass (no recompute)."""
    m, t = config.model, config.parallel.model_parallel
    s, b, h, a = m.seq_length, rows, m.hidden_size, m.num_heads
    scale = _activation_bytes(config) / 2
    dense = s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * scale
    return dense + (2 * s * b * h * _activation_bytes(config) if sparse else 0)  # dispatch + combine buffers


def _stage_memory(config: SigmaConfig, mesh: DeviceMesh, layouts: List[ParameterLayout], stage: int,
                  assumptions: Dict[str, Assumption]) -> StagePlan:
    m, p = config.model, config.parallel
    layers = mesh.layers_of_stage(stage)
    sparse = sum(1 for layer in layers if layer >= m.dense_layers)
    in_flight = min(p.micro_batch_num, mesh.pipeline_stages - stage)
    plan = StagePlan(stage, layers, sparse, in_flight)
    mine = [layout for layout in layouts if stage in layout.stages]

    def local(layout: ParameterLayout) -> int:  # the model/expert-parallel slice, before the optimizer shard
        return layout.elements // math.prod(layout.splits)

    expert_kinds = ("expert", "slab")
    plan.bytes["dense weights (fp32)"] = sum(4 * l.shard_elements for l in mine
                                             if l.kind in ("dense", "embedding", "state") and l.trainable)
    plan.bytes["dense gradients (fp32)"] = sum(4 * local(l) for l in mine if l.kind in ("dense", "embedding"))
    plan.bytes["dense AdamW moments (fp32)"] = sum(4 * l.shard_elements for l in mine if l.kind == "optimizer"
                                                   and not names.is_expert_parameter(l.name))
    expert_weights = sum(4 * l.shard_elements for l in mine if l.kind in expert_kinds)
    label = "ECSS slab" if config.ecss.enabled else "expert"
    plan.bytes[f"{label} weights (fp32)"] = expert_weights
    plan.bytes[f"{label} gradients (fp32)"] = sum(4 * local(l) for l in mine if l.kind in expert_kinds)
    if not config.ecss.enabled:
        plan.bytes["expert AdamW moments (fp32)"] = sum(4 * l.shard_elements for l in mine if l.kind == "optimizer"
                                                        and names.is_expert_parameter(l.name))
    plan.bytes["routing tables (int32)"] = sum(4 * l.shard_elements for l in mine if l.kind == "state"
                                               and l.name.endswith(names.ROUTING_TABLE))
    if config.train.grad_accumulation_steps > 1:  # run_step sums each micro-batch's gradients into a second set
        plan.bytes["accumulated gradients (fp32)"] = plan.bytes["dense gradients (fp32)"] + \
            plan.bytes[f"{label} gradients (fp32)"]
    if p.optimizer_shard:  # the gather of a parameter's updated rows: one whole slice at a time
        plan.bytes["optimizer-shard gather buffer (fp32)"] = max(
            (4 * local(l) for l in mine if l.kind == "optimizer" and l.opt_shard_size), default=0)
    rows = micro_batch_rows(config)
    stored = sum(
        (m.seq_length * rows * m.hidden_size * _activation_bytes(config) if p.recompute
         else _layer_working_set(config, rows, layer >= m.dense_layers)) for layer in layers)
    working = _layer_working_set(config, rows, sparse > 0) if p.recompute else 0
    plan.bytes["activations"] = int(in_flight * stored + working)
    if stage == mesh.last_stage:
        vocab_split = p.model_parallel if p.vocab_parallel else 1
        plan.bytes["logits and their gradient (fp32)"] = 3 * rows * m.seq_length * m.vocab_size // vocab_split * 4
    if mesh.pipeline_stages > 1:
        neighbours = 1 if stage in (0, mesh.last_stage) else 2
        plan.bytes["pipeline send/recv buffers"] = neighbours * 2 * rows * m.seq_length * m.hidden_size * \
            _activation_bytes(config)
    plan.bytes["runtime workspace"] = int(assumptions["workspace_bytes"].value)
    return plan


def _communication(config: SigmaConfig, mesh: DeviceMesh, stages: List[StagePlan], layouts: List[ParameterLayout],
                   per_server: int) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Bytes each device sends per step, per collective, and the bandwidth class of each: the AllReduces the
    code makes (``collective_volume.py``), each a ring that sends ``2 (n - 1) / n`` of its buffer."""
    p = config.parallel
    dp, mp, ep = mesh.data_parallel, mesh.model_parallel, mesh.expert_parallel
    ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0  # noqa: E731
    members = {"model": mp, "expert": ep, "expert_model": ep * mp, "data": dp, "expert_data": dp // ep,
               "world": dp * mp}
    volume: Dict[str, int] = {f"{kind}_allreduce": int(ring(members[kind]) * size)
                              for kind, size in collective_buffers(config).items() if size}
    busiest = max(stages, key=lambda s: (len(s.layers), s.sparse_layers))
    micro = p.micro_batch_num * config.train.grad_accumulation_steps
    if mesh.pipeline_stages > 1:
        volume["pipeline_send_recv"] = int(2 * micro * micro_batch_rows(config) * config.model.seq_length *
                                           config.model.hidden_size * _activation_bytes(config))
    if config.ecss.enabled:
        slab = sum(4 * l.shard_elements for l in layouts if l.kind == "slab" and busiest.stage in l.stages)
        slots = max((l.shape[0] for l in layouts if l.kind == "slab"), default=0)
        # a slab smaller than the whole step's experts is reloaded for every micro-batch
        loads = 1 if slots >= whole_step_slab(config) else micro
        volume["ecss_host_to_device"] = int(loads * slab)
        volume["ecss_device_to_host"] = int(loads * slab)
    inside = per_server % mp == 0  # model-parallel groups inside one server use HCCS
    bandwidth_class = {name: "inter_server_bandwidth" for name in volume}
    bandwidth_class["model_allreduce"] = "intra_server_bandwidth" if inside else "inter_server_bandwidth"
    bandwidth_class.update(ecss_host_to_device="host_device_bandwidth", ecss_device_to_host="host_device_bandwidth")
    return volume, bandwidth_class


# what the host update moves per parameter: the fused kernel's one pass (ecss/fused_adamw.c), whose GB/s against
# the machine's memory `bench ecss` measures (host_adamw); the numpy fallback moves NUMPY_BYTES_PER_PARAMETER
HOST_ADAMW_BYTES = FUSED_BYTES_PER_PARAMETER


def _host_expert_elements(per_server: int, mesh: DeviceMesh, layouts: List[ParameterLayout],
                          stage: StagePlan) -> int:
    """Expert parameters one server's host updates per step: every slot its devices load (a bound: all
    slots filled), summed over its ``devices_per_server`` devices' model-parallel slices."""
    slab = sum(l.shard_elements for l in layouts if l.kind == "slab" and stage.stage in l.stages)
    return min(per_server, mesh.devices) * slab


def _stage_flops(config: SigmaConfig, stage: StagePlan, mesh: DeviceMesh) -> float:
    """Training FLOPs of one stage per token: its layers' share of the model's, the head on the last stage."""
    m = config.model
    head = 6.0 * m.vocab_size * m.hidden_size
    per_layer = (flops_per_token(config) - head) / m.num_layers
    return per_layer * len(stage.layers) + (head if stage.stage == mesh.last_stage else 0.0)


@dataclass
class LayoutPlan:
    config: SigmaConfig
    mesh: DeviceMesh
    layouts: List[ParameterLayout]
    stages: List[StagePlan]
    stages_without_ecss: List[StagePlan]
    communication: Dict[str, int]
    seconds: Dict[str, float]
    assumptions: Dict[str, Assumption]

    @property
    def binding(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def per_device_bytes(self) -> int:
        return self.binding.total

    @property
    def per_device_bytes_without_ecss(self) -> int:
        return max(s.total for s in self.stages_without_ecss)

    @property
    def hbm_budget_bytes(self) -> int:
        return int(self.assumptions["hbm_bytes_per_device"].value)

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.hbm_budget_bytes and self.host_fits

    @property
    def host_bytes_per_server(self) -> int:
        """ECSS's host store (fp32 weights and two moments) and the host's gradient and staging buffers
        of the experts a server's devices hold, for the busiest server."""
        if not self.config.ecss.enabled:
            return 0
        per_server = int(self.assumptions["devices_per_server"].value)
        one_expert = count_parameters(self.config).one_expert
        mp, ep = self.mesh.model_parallel, self.mesh.expert_parallel
        worst = 0
        for stage in self.stages:
            store = stage.sparse_layers * (self.config.moe.num_experts // ep) * one_expert / mp * 12
            slab = sum(4 * l.shard_elements for l in self.layouts if l.kind == "slab" and stage.stage in l.stages)
            worst = max(worst, int(min(per_server, self.mesh.devices) * (store + 2 * slab)))
        return worst

    @property
    def host_fits(self) -> bool:
        return self.host_bytes_per_server <= self.assumptions["host_bytes_per_server"].value

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def tokens_per_s(self) -> float:
        return self.config.train.batch_size * self.config.model.seq_length / self.step_seconds

    def as_dict(self) -> dict:
        mb = self.binding
        return {
            "config": self.config.source,
            "devices": self.mesh.devices,
            "layout": dataclasses.asdict(self.mesh),
            "per_device_bytes": self.per_device_bytes,
            "per_device_bytes_without_ecss": self.per_device_bytes_without_ecss,
            "hbm_budget_bytes": self.hbm_budget_bytes,
            "fits": self.fits,
            "binding_stage": mb.stage,
            "biggest_consumer": max(mb.bytes, key=mb.bytes.get),
            "host_bytes_per_server": self.host_bytes_per_server,
            "host_budget_bytes_per_server": int(self.assumptions["host_bytes_per_server"].value),
            "stages": [{"stage": s.stage, "layers": [s.layers[0], s.layers[-1]], "sparse_layers": s.sparse_layers,
                        "micro_batches_in_flight": s.in_flight, "bytes": s.bytes, "total_bytes": s.total}
                       for s in self.stages],
            "stages_without_ecss": [{"stage": s.stage, "bytes": s.bytes, "total_bytes": s.total}
                                    for s in self.stages_without_ecss],
            "communication_bytes_per_step": self.communication,
            "step_seconds": self.seconds,
            "pipeline_bubble_fraction": self.bubble,
            "tokens_per_s_estimate": self.tokens_per_s,
            "paper_tokens_per_s": self.assumptions["paper_tokens_per_s"].value,
            "parameters": [{"name": l.name, "shape": list(l.shape), "dtype": l.dtype, "dev_matrix": list(l.dev_matrix),
                            "tensor_map": list(l.tensor_map), "shard_shape": list(l.shard_shape),
                            "opt_weight_shard_size": l.opt_shard_size, "stages": list(l.stages)}
                           for l in self.layouts],
            "assumptions": {k: dataclasses.asdict(v) for k, v in self.assumptions.items()},
        }

    @property
    def bubble(self) -> float:
        micro, pp = self.config.parallel.micro_batch_num, self.mesh.pipeline_stages
        return (pp - 1) / (micro + pp - 1)


def plan_layout(config: SigmaConfig, hbm_gb: float = 32.0, host_gb: float = 512.0) -> LayoutPlan:
    """The plan of ``config``'s layout (a ConfigError if a split does not divide)."""
    assumptions = ascend_910_cluster(hbm_gb, host_gb)
    mesh = DeviceMesh.of(config)
    layouts = parameter_layouts(config)
    stages = [_stage_memory(config, mesh, layouts, s, assumptions) for s in range(mesh.pipeline_stages)]
    plain = dataclasses.replace(config, ecss=dataclasses.replace(config.ecss, enabled=False))
    plain_layouts = parameter_layouts(plain)
    stages_plain = [_stage_memory(plain, mesh, plain_layouts, s, assumptions) for s in range(mesh.pipeline_stages)]
    per_server = int(assumptions["devices_per_server"].value)
    volume, bandwidth_class = _communication(config, mesh, stages, layouts, per_server)
    p = config.parallel
    efficiency = assumptions["compute_efficiency"].value * assumptions["peak_flops"].value
    recompute = 8 / 6 if p.recompute else 1.0  # one more forward pass
    tokens_per_rank_micro = micro_batch_rows(config) * config.model.seq_length
    micro = p.micro_batch_num * config.train.grad_accumulation_steps
    slowest = max(_stage_flops(config, s, mesh) for s in stages) / mesh.model_parallel
    compute = micro * tokens_per_rank_micro * slowest * recompute / efficiency
    # every accumulation pass fills and drains the pipeline: (pp - 1) idle micro-batch slots each
    seconds = {"compute": compute, "pipeline_bubble": compute * (mesh.pipeline_stages - 1) / p.micro_batch_num}
    if config.ecss.enabled:  # the host AdamW streams weights, both moments and the gradient of every loaded expert
        updated = max(_host_expert_elements(per_server, mesh, layouts, s) for s in stages)
        seconds["ecss_host_adamw"] = updated * HOST_ADAMW_BYTES / assumptions["host_memory_bandwidth"].value
    overlap = assumptions["communication_overlap"].value
    for name, size in volume.items():
        rate = assumptions[bandwidth_class[name]].value
        exposed = 0.0 if name.startswith("ecss_") else (1 - overlap)
        seconds[name] = size / rate * exposed if not name.startswith("ecss_") else max(0.0, size / rate - compute)
    return LayoutPlan(config, mesh, layouts, stages, stages_plain, volume, seconds, assumptions)


def _remedies(config: SigmaConfig) -> str:
    p = config.parallel
    experts = config.model.sparse_layers > 0 and config.moe.table_routed
    off = [name for name, on in (("parallel.recompute", p.recompute), ("parallel.optimizer_shard", p.optimizer_shard),
                                 ("parallel.vocab_parallel", p.vocab_parallel),
                                 ("ecss.enabled", config.ecss.enabled or not experts)) if not on]
    return ("raise model or expert parallelism or train.grad_accumulation_steps (smaller micro-batches)"
            + (f", or enable {', '.join(off)}" if off else ""))


def check_fits(plan: LayoutPlan) -> None:
    """One DataError when the layout overflows device or host memory, naming the biggest consumer."""
    source = plan.config.source
    if plan.per_device_bytes > plan.hbm_budget_bytes:
        stage = plan.binding
        name = max(stage.bytes, key=stage.bytes.get)
        over = (plan.per_device_bytes - plan.hbm_budget_bytes) / GIB
        raise DataError(f"{source}: the layout does not fit: pipeline stage {stage.stage} needs "
                        f"{plan.per_device_bytes / GIB:.1f} GiB per device of {plan.hbm_budget_bytes / GIB:.0f} GiB "
                        f"(over by {over:.1f} GiB); the biggest consumer is {name} "
                        f"({stage.bytes[name] / GIB:.1f} GiB): {_remedies(plan.config)}")
    if not plan.host_fits:
        budget = plan.assumptions["host_bytes_per_server"].value
        raise DataError(f"{source}: the ECSS host store does not fit: a server needs "
                        f"{plan.host_bytes_per_server / GIB:,.0f} GiB of host memory of {budget / GIB:,.0f} GiB "
                        f"(--host-gb); spread the sparse layers over more servers (fewer pipeline stages, "
                        f"more expert_parallel)")
