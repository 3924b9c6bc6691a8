"""``pangu-sigma bench``: every benchmark of the project, one record and one table.

Parts (each in its own process, so memory and compiled graphs are its own):

* ``training``: tokens/s and MFU against the fp32 matmul peak measured in the same run (tiny, T1);
* ``routers``: RRE against learned top-1 and top-2 at the T1 shapes, forward + backward + update;
* ``moe_layer``: the same three routers on one sparse layer alone;
* ``profile``: where a T1 step's time goes, by part and by op type;
* ``memory``: peak RSS of one layer against tokens per step, and of training T4;
* ``parallel``: one process against 2 data-parallel and 4 sharded msrun workers on CPU, and the bytes
  each collective moves against the planner;
* ``ecss``: ECSS expert scaling and the 640-expert comparison (``docs/ecss.md``);
* ``data``: prepare-data tokens/s and the input pipeline's share of a step;
* ``generation``: decoding tokens/s with and without the KV cache, a sub-model against the full model;
* ``kernels``: each op of the T1 step in its candidate formulations.

Writes ``OUT/bench.json`` (every part's record and the machine: CPU model, cores, MindSpore version,
git commit, date), ``OUT/bench.md`` (the tables) and, with matplotlib, ``OUT/bench.png``; ``--docs FILE``
regenerates FILE's bench blocks (``doc_blocks.py``).
``--quick`` shrinks every part so that the whole suite checks it runs (CI), not how fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.benchmarks.doc_blocks import check_docs, machine_line, write_docs
from mindformers_sigma.benchmarks.record import check_out_dir, machine
from mindformers_sigma.errors import UserError

# part -> (module, run function, table function)
PARTS: Dict[str, Tuple[str, str, str]] = {
    "training": ("training", "run", "table"),
    "routers": ("training", "run_routers", "routers_table"),
    "moe_layer": ("moe_layer", "run", "table"),
    "profile": ("profile", "run", "table"),
    "memory": ("memory", "run", "table"),
    "parallel": ("parallel", "run", "table"),
    "ecss": ("ecss", "run", "table"),
    "data": ("data_pipeline", "run", "table"),
    "generation": ("generation", "run", "table"),
    "kernels": ("kernels", "run", "markdown_of"),
}


def _function(part: str, which: int) -> Callable:
    module = importlib.import_module(f"mindformers_sigma.benchmarks.{PARTS[part][0]}")
    return getattr(module, PARTS[part][which])


def parts_of(only: Optional[str]) -> List[str]:
    """The parts ``--only a,b`` names (all when None); an unknown name is one line listing the known ones."""
    if only is None:
        return list(PARTS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise UserError(f"--only {only!r}: unknown part {unknown[0] if unknown else '(none)'!r}; parts: "
                        f"{', '.join(PARTS)}")
    return names


def _start_part(part: str, quick: bool, out_dir: str, log_dir: str) -> Tuple[subprocess.Popen, float]:
    command = [sys.executable, "-m", "mindformers_sigma.benchmarks.suite", "--part", part, "--out", out_dir]
    with open(os.path.join(log_dir, f"{part}.log"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(command + (["--quick"] if quick else []), stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3")))
    return process, time.perf_counter()


def _run_parts(names: List[str], quick: bool, out_dir: str, at_once: int) -> Dict[str, dict]:
    """Each part in its own process, ``at_once`` at a time (1 for real figures: parts sharing the cores would
    slow each other; 2 in quick mode, where only running is checked)."""
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    waiting, running, records = sorted(names, key=lambda name: name != "ecss"), {}, {}  # the longest first
    while waiting or running:
        while waiting and len(running) < at_once:
            part = waiting.pop(0)
            print(f"bench: {part}", file=sys.stderr, flush=True)
            running[part] = _start_part(part, quick, out_dir, log_dir)
        for part, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[part]
            if process.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                with open(os.path.join(log_dir, f"{part}.log"), encoding="utf-8", errors="replace") as handle:
                    last = (handle.read().strip().splitlines() or ["no output"])[-1]
                raise UserError(f"bench {part}: failed: {last} (log: {log_dir}/{part}.log)")
            with open(os.path.join(out_dir, f"{part}.json"), encoding="utf-8") as handle:
                records[part] = dict(json.load(handle), wall_seconds=time.perf_counter() - started)
        time.sleep(0.2)
    return {name: records[name] for name in names}


def part_table(part: str, part_record: dict) -> str:
    """A part's markdown table(s)."""
    return _function(part, 2)(part_record)


def markdown(record: dict) -> str:
    lines = [machine_line(record)]
    for part, part_record in record["parts"].items():
        lines += ["", f"## {part}", "", part_table(part, part_record), "", f"({part_record['wall_seconds']:.0f} s)"]
    return "\n".join(lines) + "\n"


def _plot(record: dict, path: str) -> bool:
    """A bar chart of the headline tokens/s figures; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars: List[Tuple[str, float]] = []
    parts = record["parts"]
    for name, row in parts.get("training", {}).get("results", {}).items():
        bars.append((f"train {name}", row["tokens_per_s"]))
    for name, row in parts.get("routers", {}).get("results", {}).items():
        bars.append((f"T1 {name}", row["tokens_per_s"]))
    for batch, row in parts.get("generation", {}).get("decoding", {}).items():
        bars.append((f"decode b{batch} cache", row["kv_cache"]["decode_tokens_per_s"]))
        bars.append((f"decode b{batch} no cache", row["no_cache"]["decode_tokens_per_s"]))
    if not bars:
        return False
    figure, axes = plt.subplots(figsize=(8, 0.4 * len(bars) + 1))
    axes.barh([label for label, _ in bars], [value for _, value in bars])
    axes.set_xlabel("tokens/s")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path + ".tmp.png")
    plt.close(figure)
    os.replace(path + ".tmp.png", path)
    return True


def run_suite(quick: bool, only: Optional[str], out_dir: str, docs: Sequence[str] = ()) -> dict:
    """Run the parts, write OUT/bench.json, bench.md and bench.png, and regenerate the bench blocks of each
    of ``docs`` (``doc_blocks.py``) from this run; a document this run cannot fill is refused first."""
    names = parts_of(only)
    check_out_dir(out_dir)
    check_docs(docs, names, "this run")
    parts = _run_parts(names, quick, out_dir, at_once=2 if quick else 1)
    record = {"benchmark": "suite", "quick": quick, "parts": parts, "machine": machine()}
    write_bytes_atomic(os.path.join(out_dir, "bench.json"), json.dumps(record, indent=1).encode() + b"\n")
    text = markdown(record)
    write_bytes_atomic(os.path.join(out_dir, "bench.md"), text.encode())
    plotted = _plot(record, os.path.join(out_dir, "bench.png"))
    print(text)
    print(f"wrote {out_dir}/bench.json, bench.md" + (", bench.png" if plotted else ""), file=sys.stderr)
    if docs:  # read again: the documents may have been edited while the parts ran
        write_docs(check_docs(docs, names, "this run"), record, f"the run in {out_dir}")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child-process entry: one part, which writes OUT/PART.json."""
    parser = argparse.ArgumentParser(description="one part of `pangu-sigma bench`")
    parser.add_argument("--part", required=True, choices=list(PARTS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    _function(args.part, 1)(args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
