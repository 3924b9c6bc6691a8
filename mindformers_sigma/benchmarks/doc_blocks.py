"""Benchmark figures in the README and the docs, generated from a ``pangu-sigma bench`` record.

A document holds figures only inside blocks::

    <!-- bench:NAME -->
    (generated text)
    <!-- /bench -->

``NAME`` is a part of the suite (its table, as in ``bench.md``) or ``headline`` (the README's table
of headline figures).  ``pangu-sigma bench --docs FILE`` rewrites every block of FILE from the run
it just made; ``tests/test_docs.py`` checks every block of the README and ``docs/`` against the
committed record (``bench/results/suite/bench.json``), so a figure cannot drift from its record.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Callable, Dict, List

from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.benchmarks.record import markdown_table
from mindformers_sigma.errors import UserError

BLOCK = re.compile(r"(<!-- bench:([a-z_]+) -->\n)(.*?)(<!-- /bench -->)", re.DOTALL)


def machine_line(record: dict) -> str:
    info = record["machine"]
    return (f"Machine: {info['cpu_model']}, {info['cpus']} cores; MindSpore {info['mindspore']}; commit "
            f"{info['git_commit'][:12]}; {info['date'][:10]}" + (" (quick mode: sizes shrunk, figures not meaningful)"
                                                               if record["quick"] else ""))


def _headline_rows(parts: dict) -> List[List[str]]:
    """(figure, value, part) for each headline figure whose part is in the record."""
    rows: List[List[str]] = []

    def add(part: str, figure: str, value: Callable[[dict], str]) -> None:
        if part in parts:
            rows.append([figure, value(parts[part]), f"`bench {part}`"])

    add("training", "training tokens/s, T1 shapes (MFU against the same run's matmul peak)",
        lambda p: f"{p['results']['t1']['tokens_per_s']:,.0f} (MFU {p['results']['t1']['mfu']:.2f})")
    add("routers", "RRE against learned top-1, whole T1 training step",
        lambda p: f"{p['results']['rre']['speed_vs_top1']:.2f}x")
    add("moe_layer", "RRE against learned top-1, one sparse layer",
        lambda p: f"{p['variants']['rre']['speed_vs_top1']:.2f}x")
    add("ecss", "RRE + ECSS against learned top-1 with every expert resident, 640 experts",
        lambda p: f"{p['speedup_vs_moe']:.2f}x")
    add("ecss", "ECSS tokens/s at 1,024 experts against 16 (device memory flat)",
        lambda p: f"{p['scaling'][-1]['tokens_per_s'] / p['scaling'][0]['tokens_per_s']:.2f}x")
    add("generation", "KV-cache decoding against full recompute, batch 1 / batch 8",
        lambda p: f"{p['decoding']['1']['speedup']:.1f}x / {p['decoding']['8']['speedup']:.1f}x")
    add("memory", "peak RSS training T4",
        lambda p: f"{p['train']['peak_rss_mb'] / 1024:.1f} GiB")
    add("dp_scaling", "2 data-parallel msrun workers against 1 process (2 cores shared)",
        lambda p: f"{p['ratio']:.2f}x")
    add("data", "prepare-data tokens/s (demo corpus, end to end)",
        lambda p: f"{p['prepare_data_tokens_per_second']:,.0f}")
    return rows


def render(name: str, record: dict) -> str:
    """The text of block ``name`` from a suite record (``bench.json``)."""
    from mindformers_sigma.benchmarks.suite import PARTS, part_table

    parts = record["parts"]
    if name == "headline":
        body = "\n".join(markdown_table(["figure", "value", "from"], _headline_rows(parts)))
    elif name in PARTS and name in parts:
        body = part_table(name, parts[name])
    else:
        raise UserError(f"bench block {name!r}: the record has no such part (parts: {', '.join(parts)})")
    return f"{body}\n\n{machine_line(record)}\n"


def blocks(text: str) -> Dict[str, str]:
    """Every block of a document: name -> its current text."""
    return {match.group(2): match.group(3) for match in BLOCK.finditer(text)}


def refreshed(text: str, record: dict) -> str:
    """``text`` with every block regenerated from ``record``."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), record) + m.group(4), text)


def check_doc_file(path: str) -> None:
    """Fail before minutes of benchmarking: ``--docs FILE`` must be a writable file with blocks."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise UserError(f"--docs {path}: cannot be read and written ({err.strerror or err}); pass a document "
                        f"with bench blocks") from None
    except UnicodeDecodeError:
        raise UserError(f"--docs {path}: is not UTF-8 text; pass a markdown document with bench blocks") from None
    if not blocks(text):
        raise UserError(f"--docs {path}: has no <!-- bench:NAME --> ... <!-- /bench --> block to fill; add one "
                        f"where the figures go")


def refresh_file(path: str, record: dict) -> None:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    write_bytes_atomic(path, refreshed(text, record).encode("utf-8"))


def refresh_docs(record_path: str, docs: List[str]) -> None:
    """``pangu-sigma bench --record BENCH_JSON --docs FILE...``: the blocks of each FILE from an earlier run."""
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"--record {record_path}: cannot be read as a bench.json ({err}); pass the bench.json of "
                        f"a pangu-sigma bench run") from None
    if not (isinstance(record, dict) and record.get("benchmark") == "suite" and isinstance(record.get("parts"), dict)
            and isinstance(record.get("machine"), dict)):
        raise UserError(f"--record {record_path}: not the bench.json of a pangu-sigma bench run (no suite, parts and "
                        f"machine fields)")
    for path in docs:
        check_doc_file(path)
    rendered = {}
    for path in docs:
        with open(path, encoding="utf-8") as handle:
            rendered[path] = refreshed(handle.read(), record)  # every block renders before any file is written
    for path, text in rendered.items():
        write_bytes_atomic(path, text.encode("utf-8"))
        print(f"wrote the bench blocks of {path}", file=sys.stderr)
