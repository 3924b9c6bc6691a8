"""Benchmark figures in the README and the docs, generated from a ``pangu-sigma bench`` record.

A document holds figures only inside blocks::

    <!-- bench:NAME -->
    (generated text)
    <!-- /bench -->

``NAME`` is a part of the suite (its table, as in ``bench.md``), ``headline`` (the README's table
of headline figures, drawn from several parts) or ``targets`` (``docs/PERFORMANCE.md``: each speed and
memory target against its figure).  ``pangu-sigma bench --docs FILE`` rewrites every
block of FILE from the run it makes, and ``--record BENCH_JSON --docs FILE`` from an earlier run;
``tests/test_docs.py`` checks every block of the README and ``docs/`` against the committed record
(``bench/results/suite/bench.json``), so a figure cannot drift from its record.  A document whose
blocks the run cannot fill (a part left out, an unknown name, a block left open) is refused before
anything runs, and every file is rendered before any is written.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Collection, Dict, List, Sequence, Set, Tuple

from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.benchmarks.record import markdown_table
from mindformers_sigma.errors import UserError

# a marker is a line of its own (a marker's text quoted inside a sentence is not one)
MARKER = re.compile(r"^<!-- (?:bench:([A-Za-z0-9_]*)|/bench) -->[ \t]*\r?$", re.MULTILINE)
HEADLINE = "headline"
TARGETS = "targets"
MAX_DOC_BYTES = 4 * 2 ** 20  # a markdown document; anything larger is not one

# (part, figure, value from the part's record) for each row of the README's headline table
HEADLINE_ROWS: Tuple[Tuple[str, str, Callable[[dict], str]], ...] = (
    ("training", "training tokens/s, T1 shapes (MFU against the same run's matmul peak)",
     lambda p: f"{p['results']['t1']['tokens_per_s']:,.0f} (MFU {p['results']['t1']['mfu']:.2f})"),
    ("routers", "RRE against learned top-1, whole T1 training step",
     lambda p: f"{p['results']['rre']['speed_vs_top1']:.2f}x"),
    ("moe_layer", "RRE against learned top-1, one sparse layer",
     lambda p: f"{p['variants']['rre']['speed_vs_top1']:.2f}x"),
    ("ecss", "RRE + ECSS against learned top-1 with every expert resident, 640 experts",
     lambda p: f"{p['speedup_vs_moe']:.2f}x"),
    ("ecss", "ECSS tokens/s at 1,024 experts against 16 (device memory flat)",
     lambda p: f"{p['scaling'][-1]['tokens_per_s'] / p['scaling'][0]['tokens_per_s']:.2f}x"),
    ("generation", "KV-cache decoding against full recompute, batch 1 / batch 8",
     lambda p: f"{p['decoding']['1']['speedup']:.1f}x / {p['decoding']['8']['speedup']:.1f}x"),
    ("memory", "peak RSS training T4", lambda p: f"{p['train']['peak_rss_mb'] / 1024:.1f} GiB"),
    ("parallel", "4 msrun workers (data 2 x model 2, experts over 2) against 1 process (2 cores shared)",
     lambda p: f"{p['layouts'][-1]['ratio']:.2f}x"),
    ("data", "prepare-data tokens/s (demo corpus, end to end)",
     lambda p: f"{p['prepare_data_tokens_per_second']:,.0f}"),
)


# (part, target, figure from the part's record, whether the figure meets it): issue 26's "done when"
TARGET_ROWS: Tuple[Tuple[str, str, Callable[[dict], str], Callable[[dict], bool]], ...] = (
    ("ecss", "host AdamW at most 40 bytes per parameter",
     lambda p: f"{p['host_adamw']['bytes_per_parameter']} bytes", lambda p: p["host_adamw"]["bytes_per_parameter"] <= 40),
    ("ecss", "host AdamW at 60% or more of the memory's streaming GB/s (same run)",
     lambda p: f"{p['host_adamw']['gbytes_per_s'] / p['host_adamw']['memory_gbytes_per_s']:.0%} "
               f"({p['host_adamw']['gbytes_per_s']:.1f} of {p['host_adamw']['memory_gbytes_per_s']:.1f} GB/s)",
     lambda p: p["host_adamw"]["gbytes_per_s"] >= 0.6 * p["host_adamw"]["memory_gbytes_per_s"]),
    ("ecss", "RRE + ECSS at 3x or more of learned top-1 with every expert resident, 640 experts",
     lambda p: f"{p['speedup_vs_moe']:.2f}x (ECSS time the step waited for: "
               f"{p['comparison']['ecss']['exposed_seconds_per_step']:.3f} of "
               f"{p['comparison']['ecss']['step_seconds']:.3f} s)",
     lambda p: p["speedup_vs_moe"] >= 3.0),
    ("training", "T1 MFU 0.44 or more against a 2048³ fp32 matmul peak (same run)",
     lambda p: f"{p['results']['t1']['mfu_2048']:.3f} (peak {p['peak_2048_gflops']:.0f} GFLOP/s)",
     lambda p: p["results"]["t1"]["mfu_2048"] >= 0.44),
    ("memory", "T4 peak RSS 4.9 GB or less", lambda p: f"{p['train']['peak_rss_mb'] / 1000:.1f} GB",
     lambda p: p["train"]["peak_rss_mb"] <= 4900),
    ("routers", "RRE at 1.0x or more of the learned top-1 gate, whole T1 step",
     lambda p: f"{p['results']['rre']['speed_vs_top1']:.2f}x", lambda p: p["results"]["rre"]["speed_vs_top1"] >= 1.0),
)


def machine_line(record: dict) -> str:
    info = record["machine"]
    return (f"Machine: {info['cpu_model']}, {info['cpus']} cores; MindSpore {info['mindspore']}; commit "
            f"{info['git_commit'][:12]}; {info['date'][:10]}" + (" (quick mode: sizes shrunk, figures not meaningful)"
                                                               if record["quick"] else ""))


def parts_needed(name: str) -> Set[str]:
    """The suite parts block ``name`` is drawn from."""
    if name == TARGETS:
        return {part for part, _, _, _ in TARGET_ROWS}
    return {part for part, _, _ in HEADLINE_ROWS} if name == HEADLINE else {name}


def render(name: str, record: dict) -> str:
    """The text of block ``name`` from a suite record (``bench.json``) that holds every part it needs."""
    from mindformers_sigma.benchmarks.suite import part_table

    parts = record["parts"]
    if name == HEADLINE:
        body = "\n".join(markdown_table(["figure", "value", "from"], (
            [figure, value(parts[part]), f"`bench {part}`"] for part, figure, value in HEADLINE_ROWS)))
    elif name == TARGETS:
        body = "\n".join(markdown_table(["target", "measured", "met", "from"], (
            [target, value(parts[part]), "yes" if met(parts[part]) else "**no**", f"`bench {part}`"]
            for part, target, value, met in TARGET_ROWS)))
    else:
        body = part_table(name, parts[name])
    return f"{body}\n\n{machine_line(record)}\n"


@dataclass(frozen=True)
class Block:
    name: str
    start: int  # where its generated text starts (after the opening marker's line)
    end: int  # where the closing marker starts


def parse_blocks(text: str, where: str) -> List[Block]:
    """Every block of a document, in order; a marker out of place (a block left open, a closing marker
    without its opening) or an unknown name is one UserError naming the line."""
    from mindformers_sigma.benchmarks.suite import PARTS

    found: List[Block] = []
    opened = None
    for match in MARKER.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        name = match.group(1)
        if name is None and opened is None:
            raise UserError(f"{where}: line {line}: <!-- /bench --> closes no block; remove it or open the block "
                            f"with <!-- bench:NAME -->")
        if name is None:
            found.append(Block(opened[0], opened[1], match.start()))
            opened = None
            continue
        if opened is not None:
            raise UserError(f"{where}: line {opened[2]}: <!-- bench:{opened[0]} --> has no <!-- /bench --> before the "
                            f"next block; close it")
        if name not in (HEADLINE, TARGETS) and name not in PARTS:
            raise UserError(f"{where}: line {line}: unknown bench block {name!r}; names: {HEADLINE}, {TARGETS}, "
                            f"{', '.join(PARTS)}")
        opened = (name, match.end() + 1, line)  # the generated text starts on the next line
    if opened is not None:
        raise UserError(f"{where}: line {opened[2]}: <!-- bench:{opened[0]} --> has no <!-- /bench -->; close it")
    return found


def blocks(text: str, where: str = "<document>") -> Dict[str, str]:
    """Every block of a document: name -> its current text."""
    return {block.name: text[block.start:block.end] for block in parse_blocks(text, where)}


def refreshed(text: str, record: dict, where: str, source: str) -> str:
    """``text`` with every block regenerated from ``record`` (read from ``source``), keeping the
    document's line endings."""
    newline = "\r\n" if "\r\n" in text else "\n"
    pieces, position = [], 0
    for block in parse_blocks(text, where):
        try:
            generated = render(block.name, record)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, ZeroDivisionError) as err:
            raise UserError(f"{source}: cannot fill block {block.name!r} of {where} ({type(err).__name__}: "
                            f"{str(err)[:80]}): a field of the record is missing or malformed; use the bench.json of "
                            f"a complete pangu-sigma bench run") from None
        pieces += [text[position:block.start], generated.replace("\n", newline)]
        position = block.end
    return "".join(pieces) + text[position:]


def read_doc(path: str) -> str:
    """A ``--docs`` document: a regular, writable, UTF-8 file of at most MAX_DOC_BYTES with at least one block."""
    target = os.path.realpath(path)  # a symlinked document: its target is the one rewritten
    if not os.path.isfile(target):
        raise UserError(f"--docs {path}: {'no such file' if not os.path.exists(target) else 'not a regular file'}; "
                        f"pass a markdown document with bench blocks")
    if os.path.getsize(target) > MAX_DOC_BYTES:
        raise UserError(f"--docs {path}: larger than {MAX_DOC_BYTES // 2 ** 20} MiB; pass a markdown document with "
                        f"bench blocks")
    try:
        with open(target, "rb") as handle:
            text = handle.read(MAX_DOC_BYTES + 1).decode("utf-8")
        with open(target, "ab"):
            pass
    except OSError as err:
        raise UserError(f"--docs {path}: cannot be read and written ({err.strerror or err}); pass a writable "
                        f"document") from None
    except UnicodeDecodeError:
        raise UserError(f"--docs {path}: is not UTF-8 text; pass a markdown document with bench blocks") from None
    if not parse_blocks(text, f"--docs {path}"):
        raise UserError(f"--docs {path}: has no <!-- bench:NAME --> ... <!-- /bench --> block to fill; add one "
                        f"where the figures go")
    return text


def check_docs(docs: Sequence[str], parts: Collection[str], what: str) -> Dict[str, str]:
    """Each ``--docs`` file's text, after checking that ``parts`` (those ``what`` holds) fill every block."""
    texts = {}
    for path in docs:
        texts[path] = text = read_doc(path)
        for name in blocks(text, f"--docs {path}"):
            missing = sorted(parts_needed(name) - set(parts))
            if missing:
                raise UserError(f"--docs {path}: block {name!r} needs part(s) {', '.join(missing)}, which {what} "
                                f"lacks; run every part (no part name, no --only), or leave this document out")
    return texts


def write_docs(texts: Dict[str, str], record: dict, source: str) -> None:
    """Regenerate every block of every document; nothing is written unless all of them render."""
    rendered = {path: refreshed(text, record, f"--docs {path}", source) for path, text in texts.items()}
    for path, text in rendered.items():
        write_bytes_atomic(os.path.realpath(path), text.encode("utf-8"))
        print(f"wrote the bench blocks of {path}", file=sys.stderr)


def refresh_docs(record_path: str, docs: List[str]) -> None:
    """``pangu-sigma bench --record BENCH_JSON --docs FILE...``: the blocks of each FILE from an earlier run."""
    source = f"--record {record_path}"
    if not os.path.isfile(record_path) or os.path.getsize(record_path) > 64 * 2 ** 20:
        raise UserError(f"{source}: not a bench.json (missing, not a regular file, or larger than 64 MiB); pass the "
                        f"bench.json of a pangu-sigma bench run")
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{source}: cannot be read as a bench.json ({str(err)[:120]}); pass the bench.json of a "
                        f"pangu-sigma bench run") from None
    if not (isinstance(record, dict) and record.get("benchmark") == "suite" and isinstance(record.get("parts"), dict)
            and isinstance(record.get("machine"), dict) and isinstance(record.get("quick"), bool)):
        raise UserError(f"{source}: not the bench.json of a pangu-sigma bench run (no suite, quick, parts and machine "
                        f"fields)")
    write_docs(check_docs(docs, record["parts"], "the record"), record, source)
