"""Shared by the launcher tests: small configs, rank tables, stub interpreters, and running the script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import REPO, tiny_raw

SCRIPT = REPO / "run" / "distributed_train.sh"
VENV_BIN = Path(sys.executable).parent  # msrun lives here


def micro_yaml(tmp_path, dropout=0.0, steps=3, name="micro.yaml", batch_size=8, device_target=None, **parallel):
    """The micro model as a YAML file; ``parallel`` updates its parallel section, ``device_target`` its context."""
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, num_layers=3,
                        dense_layers=1, sparse_layers=2, seq_length=16, dropout_rate=dropout)
    raw["train"].update(batch_size=batch_size, steps=steps, warmup_steps=1, peak_flops=1.0e11, log_interval=1)
    raw["parallel"].update(parallel)
    if device_target:
        raw["context"]["device_target"] = device_target
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def ascend_yaml(tmp_path, devices, name="ascend.yaml"):
    """An Ascend config for ``devices`` ranks (hybrid_parallel, data parallel over all of them)."""
    return micro_yaml(tmp_path, name=name, batch_size=max(8, devices), device_target="Ascend", mode="hybrid_parallel",
                      device_num=devices, data_parallel=devices)


def rank_table(tmp_path, servers=1, devices=8, device_ids=None, name="rank_table.json"):
    """A valid HCCL rank table: servers 10.0.0.1, 10.0.0.2, ...; ranks numbered server by server."""
    device_ids = device_ids or list(range(devices))
    server_list = [{"server_id": f"10.0.0.{s + 1}", "host_nic_ip": "reserve",
                    "device": [{"device_id": str(d), "device_ip": f"192.168.{s}.{d + 1}",
                                "rank_id": str(s * len(device_ids) + i)} for i, d in enumerate(device_ids)]}
                   for s in range(servers)]
    path = tmp_path / name
    path.write_text(json.dumps({"version": "1.0", "server_count": str(servers), "server_list": server_list,
                                "status": "completed"}))
    return path


def base_env(**extra):
    """A clean environment: no activated venv, no exported rank table; msrun and pytest's Python on PATH."""
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/tmp")}
    env.update({key: str(value) for key, value in extra.items()})
    return {key: value for key, value in env.items() if value != "None"}


def launcher(*args, env=None, cwd=REPO, **kwargs):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env or base_env(), **kwargs)


def python_stub(folder, body):
    """An executable `python` in ``folder``: runs ``body`` (bash), else hands over to the real Python.

    With PYTHON pointing at it, the launcher's own checks go through to the real Python, a rank-table
    launch starts each rank with it, and msrun's ranks get it too (the launcher puts its folder
    first on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "python"
    stub.write_text(f"#!/usr/bin/env bash\n{body}\nexec {sys.executable} \"$@\"\n")
    stub.chmod(0o755)
    return stub


def start_launcher(stub, *args, env=(), cwd=REPO):
    """The launcher in the background, leading its own process group (stdout and stderr to files next
    to the stub)."""
    out, err = open(stub.parent / "stdout", "w"), open(stub.parent / "stderr", "w")
    return subprocess.Popen(["bash", str(SCRIPT), *map(str, args)], stdout=out, stderr=err, cwd=cwd,
                            env=base_env(PYTHON=stub, **dict(env)), start_new_session=True)


def wait_for_files(folder, count, timeout=60.0):
    """Wait until ``folder`` holds ``count`` files (the pids stub ranks write when they start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(folder.glob("*")) if folder.exists() else []
        if len(files) >= count and all(f.read_text().strip() for f in files):
            return {f.name: int(f.read_text()) for f in files}
        time.sleep(0.05)
    raise AssertionError(f"only {len(files)} of {count} pid files in {folder} after {timeout} s")


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
