"""One JSON record per benchmark, written atomically, with the machine and software it ran on."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Iterable, List, Sequence

from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.errors import UserError


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """HEAD, marked ``+uncommitted`` when the checkout has changes (the record is then not HEAD's)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+uncommitted" if dirty else "")) if head else "unknown"


def machine() -> dict:
    import mindspore

    return {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "mindspore": mindspore.__version__, "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    """A markdown table's lines: the header, its separator (one ``---`` per column), then the rows."""
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def write_record(path: str, record: dict, echo: bool = True) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(dict(record, machine=machine()), indent=2)
    write_bytes_atomic(path, text.encode() + b"\n")
    if echo:
        print(text)


def write_part(out_dir: str, part: str, quick: bool, figures: dict) -> dict:
    """A suite part's record ``OUT/PART.json``: its figures with the part's name, the mode and the machine."""
    record = dict(benchmark=part, quick=quick, **figures)
    write_record(os.path.join(out_dir, f"{part}.json"), record, echo=False)
    return record


def check_out_dir(out_dir: str) -> None:
    """Fail before minutes of benchmarking, not after: the folder must be creatable and writable."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-probe-{os.getpid()}")  # parts run at once, each with its own probe
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write there ({err.strerror or err}); pass a writable folder") \
            from None
