"""``pangu-sigma bench ecss``: ECSS against the number of experts, and against a learned-gate MoE.

* scaling: experts per sparse layer 16 -> 64 -> 256 -> 1024 (more domains, 4 experts each), the
  T1 shapes otherwise, batch 4 x 256 so a step activates at most 16 experts per layer and the
  slab holds 16 in every case: tokens/s, device- and host-resident bytes, bytes loaded per step;
* speedup_vs_moe: 640 experts per sparse layer (40 domains x 16) at the T1 shapes, RRE with ECSS
  against the learned top-1 gate (capacity factor 1.25) with every expert resident and updated by
  the device optimizer; plus that optimizer's time alone, which explains most of the gap;
* reload: that ECSS case with 4 micro-batches per step, the whole-step slab (one load) against
  the smallest safe slab (reloaded between micro-batches): device memory against loading traffic;
* host_adamw: the host update of 12 of 32 experts of shape [512, 2048] (the best of 10 runs), the
  fused kernel against the numpy rule, and the fused kernel's GB/s against the memory's streaming
  bandwidth for the same pattern (read four arrays of that many elements, write three, no arithmetic,
  over the kernel's threads) measured in the same run.

Every case runs in a fresh process (``python -m mindformers_sigma.benchmarks.ecss --case ...``)
so each one's memory is its own.  ``--quick`` shrinks the model and the steps (a CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_record
from mindformers_sigma.errors import UserError

T1 = Path(__file__).resolve().parents[2] / "ascend_configs" / "bench_t1_cpu.yaml"
QUICK = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=256", "model.seq_length=64"]


def _experts(total: int, per_domain: int) -> List[str]:
    return [f"moe.num_experts={total}", f"moe.num_domains={total // per_domain}",
            f"moe.experts_per_domain={per_domain}"]


def scaling_cases(quick: bool) -> List[tuple]:
    sizes = (16, 64) if quick else (16, 64, 256, 1024)
    return [(experts, _experts(experts, 4) + ["ecss.enabled=true", "ecss.slab_experts=16", "train.batch_size=4"])
            for experts in sizes]


def comparison_cases(quick: bool) -> dict:
    experts = 64 if quick else 640
    common = _experts(experts, 16)
    return {"ecss": common + ["ecss.enabled=true"],
            "moe": common + ["moe.router=switch", "moe.capacity_factor=1.25"]}


def reload_cases(quick: bool) -> dict:
    """The comparison's ECSS case with 4 micro-batches per step: the default slab (the whole step's
    experts, one load) against the smallest safe one (one micro-batch's, reloaded between them)."""
    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.ecss.slab import smallest_safe_slab, whole_step_slab

    overrides = comparison_cases(quick)["ecss"] + ["train.grad_accumulation_steps=4"]
    config = apply_overrides(load_config(T1), overrides)
    safe = smallest_safe_slab(config)
    return {"whole_step_slab": (whole_step_slab(config), overrides),
            "smallest_safe_slab": (safe, overrides + [f"ecss.slab_experts={safe}"])}


def run_case(overrides: Sequence[str], steps: int, quick: bool, optimizer_only: bool = False) -> dict:
    """One case in a child process (its last stdout line is the JSON result); in ``quick`` mode in this
    process, as only that it runs is checked and a process start costs more than a quick case."""
    if quick:
        case = list(overrides) + QUICK
        return _optimizer_only(case) if optimizer_only else _case_result(case, steps)
    command = [sys.executable, "-m", "mindformers_sigma.benchmarks.ecss", "--case",
               json.dumps(list(overrides) + (QUICK if quick else [])), "--steps", str(steps)]
    if optimizer_only:
        command.append("--optimizer-only")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"bench ecss: case {' '.join(overrides)} failed: "
                        f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_result(overrides: List[str], steps: int) -> dict:
    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.training.trainer import train

    config = apply_overrides(load_config(T1), overrides)
    summary = train(config, steps=steps, log=lambda line: print(line, file=sys.stderr))
    step_seconds = config.train.batch_size * config.model.seq_length / summary.tokens_per_second
    result = {"tokens_per_s": summary.tokens_per_second, "step_seconds": step_seconds,
              "device_resident_bytes": summary.device_resident_bytes, "peak_rss_mb": summary.peak_rss_mb,
              "compile_seconds": summary.compile_seconds}
    if summary.ecss:
        result.update(host_resident_bytes=summary.ecss["host_resident_bytes"],
                      h2d_bytes_per_step=summary.ecss["h2d_bytes"] / steps,
                      transfer_seconds_per_step=summary.ecss["transfer_seconds"] / summary.ecss["timed_steps"],
                      host_update_seconds_per_step=summary.ecss["host_update_seconds"] / summary.ecss["timed_steps"],
                      exposed_seconds_per_step=summary.ecss["exposed_seconds"] / summary.ecss["timed_steps"],
                      slab_loads_per_step=summary.ecss["slab_loads"] / steps)
    return result


def _optimizer_only(overrides: List[str], repeats: int = 3) -> dict:
    """The device optimizer's update alone (unscale, clip, AdamW) over every parameter of the config."""
    import numpy as np
    from mindspore import Tensor

    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.context import configure_context
    from mindformers_sigma.training.trainer import build_train_step

    config = apply_overrides(load_config(T1), overrides)
    configure_context(config)
    step = build_train_step(config, None)
    grads = tuple(Tensor(np.zeros(p.shape, np.float32)) for p in step.apply_gradients.optimizer.parameters)
    step.apply_gradients(grads)[0].asnumpy()
    started = time.perf_counter()
    for _ in range(repeats):
        out = step.apply_gradients(grads)
    out[0].asnumpy()
    return {"optimizer_seconds": (time.perf_counter() - started) / repeats}


def _best_seconds(action, repeats: int) -> float:
    """The fastest of ``repeats`` timed runs after one warm-up (the machine's speed, not its noise)."""
    action()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def host_adamw_bandwidth(quick: bool) -> dict:
    """The host AdamW's bytes per parameter and GB/s (fused kernel and numpy), and the memory's GB/s."""
    import numpy as np

    from mindformers_sigma.ecss.fused_kernel import fused_adamw, host_threads
    from mindformers_sigma.ecss.host_adamw import (FUSED_BYTES_PER_PARAMETER, NUMPY_BYTES_PER_PARAMETER,
                                                   AdamWSettings, adamw_rows, numpy_adamw_rows)
    from mindformers_sigma.ecss.host_store import HostExpertStore

    hidden, ffn = (128, 512) if quick else (512, 2048)
    shapes = {"w1": (hidden, ffn), "b1": (1, ffn), "w2": (ffn, hidden), "b2": (1, hidden)}
    store = HostExpertStore.allocate(["layer"], shapes, 32)
    layer = store.layers[0]
    rng = np.random.default_rng(0)
    for tensor in shapes:
        layer.moment2[tensor][...] = rng.random(layer.moment2[tensor].shape, np.float32)
    touched = np.arange(0, 32, 32 // 12)[:12]
    grads = {t: rng.standard_normal((touched.size, *shape)).astype(np.float32) for t, shape in shapes.items()}
    settings = AdamWSettings(0.9, 0.95, 1e-8, {"w1": 0.1, "w2": 0.1, "b1": 0.0, "b2": 0.0})
    parameters = touched.size * sum(int(np.prod(shape)) for shape in shapes.values())
    repeats = 3 if quick else 10
    kernel = fused_adamw()
    fused = kernel is not None
    fused_seconds = _best_seconds(lambda: adamw_rows(layer, touched, grads, 1e-6, settings), repeats)
    numpy_seconds = _best_seconds(lambda: numpy_adamw_rows(layer, touched, grads, 1e-6, settings), repeats)
    # the memory's speed for the update's pattern (read 4 arrays, write 3) over the kernel's threads, as many
    # elements as the update touches; numpy (one core, its own passes) stands in without the kernel
    arrays = [np.ones(parameters, np.float32) for _ in range(4)]
    stream = (lambda: kernel.stream_update(*arrays, parameters, host_threads())) if fused else \
        (lambda: [np.add(array, arrays[3], out=array) for array in arrays[:3]])
    stream_seconds = _best_seconds(stream, repeats)
    bytes_per_parameter = FUSED_BYTES_PER_PARAMETER if fused else NUMPY_BYTES_PER_PARAMETER
    return {"fused": fused, "parameters": parameters, "bytes_per_parameter": bytes_per_parameter,
            "seconds": fused_seconds, "gbytes_per_s": bytes_per_parameter * parameters / fused_seconds / 1e9,
            # numpy's passes partly hit the cache (its scratch row stays there), so its array traffic over its time
            # is no memory bandwidth: only its time is reported
            "numpy_bytes_per_parameter": NUMPY_BYTES_PER_PARAMETER, "numpy_seconds": numpy_seconds,
            "memory_gbytes_per_s": FUSED_BYTES_PER_PARAMETER * parameters / stream_seconds / 1e9}


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    print("bench ecss: the host AdamW against the memory's bandwidth", file=sys.stderr, flush=True)
    host_adamw = host_adamw_bandwidth(quick)
    steps = 3 if quick else 8
    scaling = []
    for experts, overrides in scaling_cases(quick):
        print(f"bench ecss: scaling, {experts} experts per sparse layer", file=sys.stderr, flush=True)
        scaling.append(dict(experts=experts, **run_case(overrides, steps, quick)))
    cases = comparison_cases(quick)
    print("bench ecss: 640-expert comparison (ECSS, then the learned gate)", file=sys.stderr, flush=True)
    ecss = run_case(cases["ecss"], steps, quick)
    serial = run_case(cases["ecss"] + ["ecss.prefetch=false"], steps, quick)
    moe = run_case(cases["moe"], steps, quick)
    moe.update(run_case(cases["moe"], steps, quick, optimizer_only=True))
    print("bench ecss: reloading a smaller slab between micro-batches", file=sys.stderr, flush=True)
    reload = reload_cases(quick)
    reloads = {name: dict(slab_experts=slab, **run_case(overrides, steps, quick))
               for name, (slab, overrides) in reload.items()}
    record = {"benchmark": "ecss", "quick": quick, "config": str(T1), "steps": steps, "scaling": scaling,
              "comparison": {"experts": 64 if quick else 640, "ecss": ecss, "ecss_without_prefetch": serial,
                             "moe": moe},
              "reload": reloads,
              "prefetch_saves_seconds_per_step": serial["step_seconds"] - ecss["step_seconds"],
              "host_adamw": host_adamw,
              "speedup_vs_moe": ecss["tokens_per_s"] / moe["tokens_per_s"]}
    write_record(os.path.join(out_dir, "ecss.json"), record, echo=False)
    print(table(record))
    return record


def table(record: dict) -> str:
    base = record["scaling"][0]["tokens_per_s"]
    lines = markdown_table(
        ["experts", "tokens/s", "vs 16", "device-resident MiB", "host-resident MiB", "loaded per step MiB"],
        ([str(row["experts"]), f"{row['tokens_per_s']:,.0f}", f"{row['tokens_per_s'] / base:.2f}x",
          f"{row['device_resident_bytes'] / 2 ** 20:,.1f}", f"{row['host_resident_bytes'] / 2 ** 20:,.1f}",
          f"{row['h2d_bytes_per_step'] / 2 ** 20:,.1f}"] for row in record["scaling"]))
    c = record["comparison"]
    ecss, moe = c["ecss"], c["moe"]
    lines += ["", f"{c['experts']} experts per sparse layer: RRE + ECSS {ecss['tokens_per_s']:,.0f} tokens/s, "
                  f"learned top-1 (all experts resident) {moe['tokens_per_s']:,.0f} tokens/s: "
                  f"speedup {record['speedup_vs_moe']:.2f}x",
              ""]
    lines += markdown_table(["part of a step, s", "RRE + ECSS", "learned top-1"], [
        ["whole step", f"{ecss['step_seconds']:.3f}", f"{moe['step_seconds']:.3f}"],
        ["whole step without prefetch", f"{c['ecss_without_prefetch']['step_seconds']:.3f}", "-"],
        ["ECSS staging, loading + gradient fetch (staging runs behind the step)",
         f"{ecss['transfer_seconds_per_step']:.3f}", "-"],
        ["host AdamW of the touched experts (part of it behind the next step)",
         f"{ecss['host_update_seconds_per_step']:.3f}", "-"],
        *([["ECSS time the step waited for (exposed)", f"{ecss['exposed_seconds_per_step']:.3f}", "-"]]
          if "exposed_seconds_per_step" in ecss else []),
        ["device optimizer over all parameters (measured alone)", "-", f"{moe['optimizer_seconds']:.3f}"],
        ["device-resident MiB", f"{ecss['device_resident_bytes'] / 2 ** 20:,.0f}",
         f"{moe['device_resident_bytes'] / 2 ** 20:,.0f}"]])
    lines += [""] + markdown_table(
        ["4 micro-batches per step", "slab experts", "loads per step", "tokens/s", "device-resident MiB",
         "loaded per step MiB"],
        ([name.replace("_", " "), str(row["slab_experts"]), f"{row['slab_loads_per_step']:.2f}",
          f"{row['tokens_per_s']:,.0f}", f"{row['device_resident_bytes'] / 2 ** 20:,.0f}",
          f"{row['h2d_bytes_per_step'] / 2 ** 20:,.1f}"] for name, row in record["reload"].items()))
    host = record.get("host_adamw")  # records before the fused kernel have none
    if host is not None:
        share = host["gbytes_per_s"] / host["memory_gbytes_per_s"]
        lines += [""] + markdown_table(
            ["host AdamW", "bytes per parameter", "seconds", "GB/s", "of the memory's GB/s"],
            [[("fused kernel" if host["fused"] else "numpy (no compiler)"), str(host["bytes_per_parameter"]),
              f"{host['seconds']:.4f}", f"{host['gbytes_per_s']:.1f}", f"{share:.0%}"],
             ["numpy rule (partly in cache)", str(host["numpy_bytes_per_parameter"]), f"{host['numpy_seconds']:.4f}",
              "-", "-"],
             ["the same traffic, no arithmetic (memory)", "28", "-", f"{host['memory_gbytes_per_s']:.1f}", "100%"]])
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child-process entry: one case, its JSON result as the last stdout line."""
    parser = argparse.ArgumentParser(description="one case of `pangu-sigma bench ecss`")
    parser.add_argument("--case", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--optimizer-only", action="store_true")
    args = parser.parse_args(argv)
    overrides = json.loads(args.case)
    result = _optimizer_only(overrides) if args.optimizer_only else _case_result(overrides, args.steps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
