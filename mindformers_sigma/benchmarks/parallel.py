"""``pangu-sigma bench parallel``: the tiny config trained by one process, by 2 data-parallel msrun workers
and by 4 workers (data 2 x model 2, experts over 2, vocabulary-parallel, optimizer shard) on CPU, same
global batch; and the bytes each of the 4 workers hands to each kind of collective in one step,
measured (``collective_count.py``) against the planner's count (``parallel/collective_volume.py``).

Throughput is the mean over steps after the first (which compiles).  On a 2-core machine every
worker shares the cores one process already uses, so the ratios measure the overhead of the
collectives and of more, smaller graphs, not a speed-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_part
from mindformers_sigma.benchmarks.training import QUICK, TINY
from mindformers_sigma.config import apply_overrides, load_config
from mindformers_sigma.errors import UserError
from mindformers_sigma.parallel.collective_volume import KINDS, collective_buffers

REPO = Path(__file__).resolve().parents[2]
SHARDED = ["parallel.model_parallel=2", "parallel.expert_parallel=2", "parallel.vocab_parallel=true",
           "parallel.optimizer_shard=true"]
LAYOUTS = {"1 process": (1, []), "2 workers, data parallel": (2, []),
           "4 workers, data 2 x model 2, experts over 2": (4, SHARDED)}


def _tokens_per_second(out_dir: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    # each record's tokens/s is a moving mean over recent steps; the first step (compile) is left out
    return float(sum(r["tokens_per_second"] for r in records[1:]) / max(1, len(records) - 1))


def _run(command: list, what: str) -> None:
    # msrun starts its workers with the `python` on PATH: this one
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), PATH=path))
    if done.returncode != 0:
        raise UserError(f"bench parallel: {what} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")


def _free_port() -> int:
    """A port nothing listens on now, for msrun's scheduler (the default one may be another launch's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sets(overrides: list) -> list:
    return [item for override in overrides for item in ("--set", override)]


def _train(work: str, name: str, workers: int, overrides: list) -> float:
    out = os.path.join(work, name)
    if workers == 1:
        _run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(TINY), "--out", out,
              *_sets(overrides)], name)
    else:
        _run(["bash", str(REPO / "run" / "distributed_train.sh"), "--cpu", "--workers", str(workers), "--master-port",
              str(_free_port()), "--log-dir", os.path.join(work, f"logs_{workers}"), str(TINY), "--", "--out", out,
              *_sets(overrides)], name)
    return _tokens_per_second(out)


def _measured_collectives(work: str, overrides: list) -> dict:
    """Bytes per kind of collective of each of the 4 workers in one step (the largest over the ranks)."""
    counts = os.path.join(work, "counts")
    os.makedirs(counts)
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    sharded = overrides + ["parallel.mode=hybrid_parallel", "parallel.device_num=4", "parallel.data_parallel=2"]
    _run([msrun, "--worker_num=4", "--local_worker_num=4", f"--master_port={_free_port()}", f"--log_dir={work}/logs_count",
          "--join=True", str(Path(__file__).with_name("collective_count.py")), str(TINY), counts, *_sets(sharded)],
         "counting the collectives of 4 workers")
    ranks = []
    for rank in range(4):
        with open(os.path.join(counts, f"rank_{rank}.json"), encoding="utf-8") as handle:
            ranks.append(json.load(handle))
    planned = collective_buffers(apply_overrides(load_config(str(TINY)), sharded))
    return {kind: {"measured_bytes": max(r.get(kind, 0) for r in ranks), "planned_bytes": planned[kind]}
            for kind in KINDS}


def run(quick: bool, out_dir: str) -> dict:
    check_out_dir(out_dir)
    steps = 4 if quick else 30
    common = [f"train.steps={steps}", "train.peak_flops=1.0e11", "train.log_interval=1000",
              *(QUICK if quick else [])]
    with tempfile.TemporaryDirectory() as work:
        tokens = {name: _train(work, f"run_{workers}_{index}", workers, common + extra)
                  for index, (name, (workers, extra)) in enumerate(LAYOUTS.items())}
        collectives = _measured_collectives(work, common + SHARDED)
    single = tokens["1 process"]
    return write_part(out_dir, "parallel", quick, {
        "config": str(TINY), "overrides": common, "steps": steps,
        "layouts": [{"layout": name, "workers": LAYOUTS[name][0], "tokens_per_s": value, "ratio": value / single}
                    for name, value in tokens.items()],
        "collectives": collectives})


def table(record: dict) -> str:
    speed = markdown_table(["tiny config, same global batch", "tokens/s", "against 1 process"],
                           [[row["layout"], f"{row['tokens_per_s']:,.0f}", f"{row['ratio']:.2f}x"]
                            for row in record["layouts"]])
    volume = markdown_table(
        ["collective (4 workers, one step, bytes per rank)", "measured", "planner", "measured / planner"],
        [[kind, f"{row['measured_bytes']:,}", f"{row['planned_bytes']:,}",
          f"{row['measured_bytes'] / row['planned_bytes']:.3f}" if row["planned_bytes"] else "-"]
         for kind, row in record["collectives"].items()])
    return "\n".join(speed) + "\n\n" + "\n".join(volume)
