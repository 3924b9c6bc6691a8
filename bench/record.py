"""Shared by the benchmarks: write one JSON record atomically and echo it."""

from __future__ import annotations

import json
import os
import platform

from mindformers_sigma.atomic import write_bytes_atomic


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_record(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(dict(record, machine=machine()), indent=2)
    write_bytes_atomic(path, text.encode() + b"\n")
    print(text)
