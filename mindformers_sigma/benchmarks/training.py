"""Training throughput: tokens/s and model-FLOPs utilisation against the fp32 matmul peak measured in the
same run (tiny and T1 configs), and RRE against learned top-1 / top-2 routers at the T1 shapes (a whole
training step: forward, backward and update).

Each case trains in a fresh process (``python -m mindformers_sigma.benchmarks.training --case ...``), so
its compiled graphs and memory are its own; steps that compile a graph are excluded from tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_record
from mindformers_sigma.errors import UserError
from mindformers_sigma.training.metrics import measure_matmul_peak

CONFIGS = Path(__file__).resolve().parents[2] / "ascend_configs"
TINY, T1 = CONFIGS / "pangu_sigma_tiny_cpu.yaml", CONFIGS / "bench_t1_cpu.yaml"
QUICK = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=256", "model.seq_length=64"]
ROUTERS = {"rre": [], "top1": ["moe.router=switch", "moe.capacity_factor=1.25"],
           "top2": ["moe.router=gshard", "moe.capacity_factor=1.25"]}


def run_case(config: Path, overrides: Sequence[str], steps: int, quick: bool = False) -> dict:
    """One training run in a child process (its last stdout line is the JSON result); in ``quick`` mode in
    this process (only that it runs is checked)."""
    if quick:
        return _train(str(config), list(overrides), steps)
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma.benchmarks.training", "--config", str(config),
                           "--case", json.dumps(list(overrides)), "--steps", str(steps)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"bench training: {config.name} {' '.join(overrides)} failed: "
                        f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train(config_path: str, overrides: List[str], steps: int) -> dict:
    from mindformers_sigma.config import apply_overrides, load_config
    from mindformers_sigma.training.trainer import train

    config = apply_overrides(load_config(config_path), overrides + ["train.peak_flops=null"])
    summary = train(config, steps=steps, log=lambda line: print(line, file=sys.stderr))
    return {"tokens_per_s": summary.tokens_per_second, "mfu": summary.mfu, "peak_gflops": summary.peak_flops / 1e9,
            "compile_seconds": summary.compile_seconds, "first_loss": summary.first_loss,
            "final_loss": summary.final_loss, "dropped_assignments": summary.dropped_assignments,
            "batch_tokens": config.train.batch_size * config.model.seq_length}


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    steps = 3 if quick else 40
    shrink = QUICK if quick else []
    configs = {"tiny": run_case(TINY, shrink, steps, quick), "t1": run_case(T1, shrink, steps, quick)}
    # issue 26's yardstick: a 2048^3 product (the trainer's own peak is 1024^3), measured in this run
    peak_2048 = measure_matmul_peak(seconds=0.5 if quick else 4.0, size=256 if quick else 2048) / 1e9
    for row in configs.values():
        row["mfu_2048"] = row["mfu"] * row["peak_gflops"] / peak_2048
    record = {"benchmark": "training", "quick": quick, "steps": steps, "overrides": shrink,
              "configs": {"tiny": str(TINY), "t1": str(T1)}, "peak_2048_gflops": peak_2048, "results": configs}
    write_record(os.path.join(out_dir, "training.json"), record, echo=False)
    return record


def run_routers(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    steps = 3 if quick else 30
    shrink = QUICK if quick else []
    results = {name: dict(overrides=overrides, **run_case(T1, shrink + overrides, steps, quick))
               for name, overrides in ROUTERS.items()}
    for result in results.values():
        result["speed_vs_top1"] = result["tokens_per_s"] / results["top1"]["tokens_per_s"]
    record = {"benchmark": "routers", "quick": quick, "steps": steps, "config": str(T1), "overrides": shrink,
              "results": results}
    write_record(os.path.join(out_dir, "routers.json"), record, echo=False)
    return record


def table(record: dict) -> str:
    lines = markdown_table(
        ["config", "tokens/s", "MFU", "peak GFLOP/s (same run)", "compile s"],
        ([name, f"{row['tokens_per_s']:,.0f}", f"{row['mfu']:.3f}", f"{row['peak_gflops']:.0f}",
          f"{row['compile_seconds']:.1f}"] for name, row in record["results"].items()))
    if "peak_2048_gflops" in record:  # records before issue 26 have none
        lines += ["", f"Against a 2048³ fp32 matmul peak of {record['peak_2048_gflops']:.0f} GFLOP/s (same run): MFU "
                      + ", ".join(f"{name} {row['mfu_2048']:.3f}" for name, row in record["results"].items())]
    return "\n".join(lines)


def routers_table(record: dict) -> str:
    return "\n".join(markdown_table(
        ["router (T1 shapes)", "tokens/s", "vs learned top-1", "dropped assignments"],
        ([name, f"{row['tokens_per_s']:,.0f}", f"{row['speed_vs_top1']:.2f}x", f"{row['dropped_assignments']:,}"]
         for name, row in record["results"].items())))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child-process entry: one training run, its JSON result as the last stdout line."""
    parser = argparse.ArgumentParser(description="one case of `pangu-sigma bench training|routers`")
    parser.add_argument("--config", required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(_train(args.config, json.loads(args.case), args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
