"""run/distributed_train.sh supervising real processes: stub interpreters that sleep or fail on demand
stand in for the ranks (no NPU needed), under both a rank table and real msrun on CPU; and real
CPU training under msrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import REPO
from launcher_helpers import (SCRIPT, alive, ascend_yaml, base_env, kill_all, launcher, micro_yaml, python_stub,
                              rank_table, start_launcher, wait_for_files, wait_gone)

GRACE = 1.5


def _sleeping_ranks(tmp_path, fail=""):
    """A stub whose ranks (rank-table ranks, msrun's workers and scheduler) write their pid to
    pids/NAME and sleep; rank 2 ignores SIGTERM, so only SIGKILL stops it; ``fail`` runs first."""
    pids = tmp_path / "pids"
    pids.mkdir()
    body = f"""
if [ -n "${{MS_ROLE:-}}" ] || [ "${{1:-}}" = {REPO}/run/train.py ]; then
  echo $$ > {pids}/"${{MS_ROLE:-rank}}_${{RANK_ID}}"
  echo "${{MS_ROLE:-rank}} $RANK_ID is up"
  {fail}
  if [ "$RANK_ID" = 2 ] && [ "${{MS_ROLE:-}}" != MS_SCHED ]; then trap "" TERM; fi
  exec sleep 300
fi"""
    return python_stub(tmp_path / "bin", body), pids


def _stderr(stub):
    return (stub.parent / "stderr").read_text()


def _run_until_ranks_started(stub, pids, count, args):
    proc = start_launcher(stub, *args)
    try:
        return proc, wait_for_files(pids, count)
    except AssertionError:
        proc.kill()
        raise AssertionError(_stderr(stub))


@pytest.mark.parametrize("mode", ["rank_table", "msrun"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_stops_every_rank_within_the_grace_period(tmp_path, mode, signum):
    logs = tmp_path / "logs"
    stub, pids = _sleeping_ranks(tmp_path)
    if mode == "rank_table":
        args = ["--rank-table", rank_table(tmp_path), ascend_yaml(tmp_path, 8)]
        count = 8
    else:  # real msrun on CPU: a scheduler and four workers
        args = ["--cpu", "--workers", 4, "--master-port", 8231 + signum, micro_yaml(tmp_path)]
        count = 5
    logs.mkdir()
    for old_log in ("rank_0.log", "worker_0.log"):  # a previous launch's: not shown for this one
        (logs / old_log).write_text("OLD LINE\n" * 1000)
    proc, ranks = _run_until_ranks_started(stub, pids, count, ["--grace-period", GRACE, "--log-dir", logs, *args])
    try:
        sent = time.monotonic()
        if signum == signal.SIGINT:
            proc.send_signal(signum)  # to the launcher alone
        else:
            os.killpg(proc.pid, signum)  # to its whole process group, as a terminal or a job scheduler does
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
        assert code == 128 + signum, _stderr(stub)
        assert [pid for pid in ranks.values() if alive(pid)] == []
        # Rank 2 ignores SIGTERM: the launcher waited the grace period, then used SIGKILL, and no longer.
        assert GRACE <= elapsed < GRACE + 5
        assert _stderr(stub).splitlines() == [
            f"distributed_train.sh: stopped by {signal.Signals(signum).name}: every rank was stopped; 1 process(es) "
            f"needed SIGKILL after the grace period (logs in {logs})"]
        leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
        assert leftovers == []  # msrun included
        shown = (stub.parent / "stdout").read_text()
        assert "OLD LINE" not in shown and f"{'MS_WORKER' if mode == 'msrun' else 'rank'} 0 is up" in shown
    finally:
        proc.kill()
        kill_all(ranks.values())


@pytest.mark.parametrize("mode", ["rank_table", "msrun"])
@pytest.mark.parametrize("failure,described", [("exit 7", "exited with code 7"),
                                               ("kill -9 $$", "was killed by signal 9 (SIGKILL)")])
def test_the_first_rank_to_fail_stops_the_others_and_is_named(tmp_path, mode, failure, described):
    logs = tmp_path / "logs"
    stub, pids = _sleeping_ranks(tmp_path, fail=f'if [ "$RANK_ID" = 1 ] && [ "${{MS_ROLE:-}}" != MS_SCHED ]; then '
                                                 f'{failure}; fi')
    if mode == "rank_table":
        args, log = ["--rank-table", rank_table(tmp_path), ascend_yaml(tmp_path, 8)], logs / "rank_1.log"
    else:
        args, log = ["--cpu", "--workers", 4, "--master-port", 8241 + len(failure), micro_yaml(tmp_path)], \
            logs / "worker_1.log"
    started = time.monotonic()
    proc = start_launcher(stub, "--grace-period", GRACE, "--log-dir", logs, *args)
    try:
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
        assert code == 3, _stderr(stub)
        (line,) = _stderr(stub).splitlines()
        # Rank 2 ignores SIGTERM: it needs SIGKILL, unless msrun already killed it (its own reaction).
        expected = f"distributed_train.sh: error: rank 1 {described} (see {log}); the other ranks were stopped"
        assert line in (expected, expected + "; 1 process(es) needed SIGKILL after the grace period")
        assert mode == "msrun" or line != expected
        started_pids = [int(p.read_text()) for p in pids.iterdir() if p.read_text().strip()]  # (a rank stopped
        # between creating its pid file and writing it left it empty)
        assert len(started_pids) >= 2 and [pid for pid in started_pids if alive(pid)] == []
        assert took < 20  # not HCCL's 20 minutes, not msrun's cluster time-out
    finally:
        proc.kill()
        kill_all(int(p.read_text()) for p in pids.iterdir() if p.read_text().strip())


def test_a_killed_launcher_takes_its_ranks_with_it(tmp_path):
    # SIGKILL cannot be caught: each rank was started with a parent-death signal (SIGTERM).
    stub, pids = _sleeping_ranks(tmp_path)
    proc, ranks = _run_until_ranks_started(stub, pids, 8, ["--rank-table", rank_table(tmp_path), "--log-dir",
                                                           tmp_path / "logs", ascend_yaml(tmp_path, 8)])
    try:
        proc.kill()
        proc.wait()
        stopping = [pid for name, pid in ranks.items() if name != "rank_2"]
        assert wait_gone(stopping, 10) == []
        assert alive(ranks["rank_2"])  # the one rank that ignores SIGTERM: a known limit, see the docs
    finally:
        kill_all(ranks.values())


PROBE = """
import json, os, sys
sys.path.insert(0, {repo!r})
from mindformers_sigma.launcher.worker import join_launch
join_launch()
import mindspore as ms
import mindspore.communication as communication
calls, groups = [], []
ms.set_device = lambda *args: calls.append(list(args))
ms.set_auto_parallel_context = lambda **kwargs: None
communication.init = lambda *args, **kwargs: None
communication.create_group = lambda name, ranks, *args, **kwargs: groups.append([name, list(ranks)])
communication.get_group_size = lambda: int(os.environ["RANK_SIZE"])
communication.get_rank = lambda: int(os.environ["RANK_ID"])
from mindformers_sigma.context import configure_context
from mindformers_sigma.training.command import add_arguments as add_train_arguments, train_config
import argparse
parser = argparse.ArgumentParser()
add_train_arguments(parser)
info = configure_context(train_config(parser.parse_args(sys.argv[2:])))
print(json.dumps({{"cwd": os.getcwd(), "set_device": calls, "rank": info.rank, "groups": groups}}))
"""


def test_each_rank_table_rank_binds_its_own_device_and_works_in_its_own_folder(tmp_path):
    # The rank runs the real context set-up with MindSpore's device and communication calls stubbed; with
    # data_parallel 2 each rank creates the groups it sums dense and expert gradients over (both ranks each).
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO)))
    stub = python_stub(tmp_path / "bin", f'case "${{1:-}}" in */run/train.py) exec {sys.executable} {probe} "$@" ;; '
                                         f'esac')
    logs = tmp_path / "logs"
    table = rank_table(tmp_path, devices=2, device_ids=[4, 6])
    result = launcher("--rank-table", table, "--log-dir", logs, ascend_yaml(tmp_path, 2),
                      env={**_env(stub)}, timeout=120)
    assert result.returncode == 0, result.stderr
    for rank, device in [(0, 4), (1, 6)]:
        report = json.loads((logs / f"rank_{rank}.log").read_text().strip().splitlines()[-1])
        assert report == {"cwd": str(logs / f"rank_{rank}"), "set_device": [["Ascend", device]], "rank": rank,
                          "groups": [["dp_m0", [0, 1]], ["edp_e0_m0", [0, 1]]]}
    assert result.stdout.splitlines()[0].startswith("distributed_train.sh: --rank-table")


def _env(stub):
    return base_env(PYTHON=stub)


# --- Real CPU training under msrun. ---

def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_parameters(out):
    from mindformers_sigma.checkpoint import files as ckpt

    step = ckpt.list_checkpoints(str(out / "checkpoints"))[-1]
    info = ckpt.read_checkpoint(str(out / "checkpoints" / f"step_{step:08d}.json"))
    return {name: value.asnumpy() for name, value in ckpt.load_parameters(info).items()}


@pytest.mark.slow
def test_two_msrun_workers_are_bitwise_one_process_accumulating_their_two_halves(tmp_path):
    # Dropout on and EOD in the data: rank r's half of the batch is micro-batch r of the single
    # process (same rows, same dropout seed, same token total), and two gradients summed are the
    # same float32 sum in either order, so the runs agree bit for bit.
    config = micro_yaml(tmp_path, dropout=0.1, steps=5)
    single = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config),
                             "--out", str(tmp_path / "one"), "--set", "train.grad_accumulation_steps=2"],
                            capture_output=True, text=True, cwd=REPO)
    assert single.returncode == 0, single.stderr[-2000:]
    logs = tmp_path / "logs"
    result = launcher("--cpu", "--workers", 2, "--master-port", 8219, "--log-dir", logs, config,
                      "--", "--out", tmp_path / "two", timeout=300)
    assert result.returncode == 0, (result.stderr[-2000:], (logs / "worker_0.log").read_text()[-2000:])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert one == two
    weights_one, weights_two = _final_parameters(tmp_path / "one"), _final_parameters(tmp_path / "two")
    assert weights_one.keys() == weights_two.keys() and any(k.startswith("adam_v.") for k in weights_one)
    for name in weights_one:
        assert np.array_equal(weights_one[name], weights_two[name]), name
    # Each rank and the scheduler worked in a folder of its own.
    assert sorted(p.name for p in logs.iterdir() if p.is_dir()) == ["rank_0", "rank_1", "scheduler"]


@pytest.mark.slow
def test_two_msrun_workers_with_ecss_are_bitwise_one_process_accumulating_their_two_halves(tmp_path):
    # Every rank plans its slab from both ranks' experts (it reads the whole batch), so both load
    # the same experts into the same slots, their slab gradients are all-reduced slot by slot and
    # each rank's host store (memory-mapped, one per rank) gets the same update: the single
    # process accumulating the two halves loads the same union and sums the same two gradients.
    config = micro_yaml(tmp_path, steps=5)
    raw = yaml.safe_load(config.read_text())
    raw["ecss"].update(enabled=True, host_store="mmap")
    raw["train"].update(checkpoint_format="safetensors", checkpoint_interval=2)
    config.write_text(yaml.safe_dump(raw))
    single = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config),
                             "--out", str(tmp_path / "one"), "--set", "train.grad_accumulation_steps=2"],
                            capture_output=True, text=True, cwd=REPO)
    assert single.returncode == 0, single.stderr[-2000:]
    logs = tmp_path / "logs"
    result = launcher("--cpu", "--workers", 2, "--master-port", 8223, "--log-dir", logs, config,
                      "--", "--out", tmp_path / "two", timeout=300)
    assert result.returncode == 0, (result.stderr[-2000:], (logs / "worker_1.log").read_text()[-2000:])
    rows_one, rows_two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                          for run in ("one", "two"))
    assert [r["loss"] for r in rows_one] == [r["loss"] for r in rows_two] and len(rows_one) == 5
    assert [r["ecss_active_experts"] for r in rows_one] == [r["ecss_active_experts"] for r in rows_two]
    weights_one, weights_two = _final_parameters(tmp_path / "one"), _final_parameters(tmp_path / "two")
    assert weights_one.keys() == weights_two.keys() and any(".experts." in k for k in weights_one)
    for name in weights_one:
        assert np.array_equal(weights_one[name], weights_two[name]), name
    assert not (tmp_path / "two" / "ecss_store").exists()  # each rank removed its scratch store


@pytest.mark.slow
def test_msrun_rank_failing_at_start_is_named_and_msrun_output_goes_to_its_log(tmp_path):
    # Rank 1 gets an unknown option: it exits with code 2 about 0.1 s after it starts, before the
    # cluster is built (msrun alone would then wait --cluster_time_out for the scheduler).
    config = micro_yaml(tmp_path)
    logs = tmp_path / "logs"
    stub = python_stub(tmp_path / "bin", """
if [ "${MS_ROLE:-}" = MS_WORKER ] && [ "${RANK_ID:-}" = 1 ]; then
  exec %s "$@" --no-such-option
fi""" % sys.executable)
    result = launcher("--cpu", "--workers", 2, "--master-port", 8227, "--log-dir", logs, config,
                      "--", "--out", tmp_path / "out", env=_env(stub), timeout=300)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"distributed_train.sh: error: rank 1 exited with code 2 (see {logs}/worker_1.log); the other ranks were "
        f"stopped"]
    assert "unrecognized arguments: --no-such-option" in (logs / "worker_1.log").read_text()
    assert "Traceback" not in result.stdout + result.stderr
    assert subprocess.run(["pgrep", "-f", str(config)], capture_output=True).stdout == b""


@pytest.mark.slow
def test_msrun_rank_killed_mid_training_is_named(tmp_path):
    # Rank 1 is SIGKILLed once rank 0 has written the metrics of step 1 (1000 steps would take
    # minutes); rank 0, blocked in the all-reduce, is stopped at once.
    config = micro_yaml(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["steps"] = 1000
    config.write_text(yaml.safe_dump(raw))
    logs, out = tmp_path / "logs", tmp_path / "out"
    stub = python_stub(tmp_path / "bin", """
if [ "${MS_ROLE:-}" = MS_WORKER ] && [ "${RANK_ID:-}" = 1 ]; then
  %s "$@" &
  until [ -s %s ]; do sleep 0.2; done
  kill -9 "$!"
  kill -9 $$
fi""" % (sys.executable, out / "metrics.jsonl"))
    result = launcher("--cpu", "--workers", 2, "--master-port", 8229, "--grace-period", 3, "--log-dir", logs, config,
                      "--", "--out", out, env=_env(stub), timeout=300)
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.splitlines()
    # Rank 0, waiting in the all-reduce for rank 1, cannot finish its step: SIGKILL after the grace
    # period (unless msrun's own reaction killed it first).
    expected = (f"distributed_train.sh: error: rank 1 was killed by signal 9 (SIGKILL) (see {logs}/worker_1.log); "
                f"the other ranks were stopped")
    assert line in (expected, expected + "; 1 process(es) needed SIGKILL after the grace period")
    assert "step      1/1000" in result.stdout  # rank 0's log is shown on stdout as it is written
    assert subprocess.run(["pgrep", "-f", str(config)], capture_output=True).stdout == b""


@pytest.mark.slow
def test_ctrl_c_under_msrun_stops_both_ranks_after_the_same_step_with_a_checkpoint_to_resume(tmp_path):
    config = micro_yaml(tmp_path, steps=1000)
    logs, out = tmp_path / "logs", tmp_path / "out"
    stub = python_stub(tmp_path / "bin", "")
    proc = start_launcher(stub, "--cpu", "--workers", 2, "--master-port", 8233, "--grace-period", 60,
                          "--log-dir", logs, config, "--", "--out", out, env={"PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_metric_lines(out)) < 3:
            time.sleep(0.2)
        assert len(_metric_lines(out)) >= 3, _stderr(stub)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, _stderr(stub)
    finally:
        proc.kill()
    last = json.loads(_metric_lines(out)[-1])["step"]
    for rank in (0, 1):  # the two ranks agreed on the step to stop after
        assert f"stopped by SIGTERM after step {last}: checkpoint saved in" in (logs / f"worker_{rank}.log").read_text()
    assert (out / "checkpoints" / f"step_{last:08d}.json").exists()
    assert _stderr(stub).splitlines()[-1].startswith("distributed_train.sh: stopped by SIGINT: every rank was "
                                                     "stopped (logs in")  # none needed SIGKILL
    assert subprocess.run(["pgrep", "-f", str(config)], capture_output=True).stdout == b""
    resumed = launcher("--cpu", "--workers", 2, "--master-port", 8235, "--log-dir", logs, config, "--", "--out", out,
                       "--resume", "auto", "--steps", last + 2, env=_env(stub), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["step"] for line in _metric_lines(out)][-3:] == [last, last + 1, last + 2]


def _metric_lines(out):
    path = out / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def test_a_log_that_cannot_be_written_stops_the_launch_before_any_rank_starts(tmp_path):
    stub, pids = _sleeping_ranks(tmp_path)
    logs = tmp_path / "logs"
    (logs / "rank_3.log").mkdir(parents=True)  # rank 3's log cannot be opened
    result = launcher("--rank-table", rank_table(tmp_path), "--grace-period", GRACE, "--log-dir", logs,
                      ascend_yaml(tmp_path, 8), env=_env(stub), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"distributed_train.sh: error: {logs}/rank_3.log: Is a directory; check the "
                                          f"path, its permissions and free space"]
    assert list(pids.iterdir()) == []  # every log is opened before the first rank starts


def test_helpers_a_rank_started_are_stopped_with_it(tmp_path):
    # Each rank leads its process group: SIGTERM to the group reaches its helpers at once, without
    # waiting for the grace period (10 s here) and SIGKILL.
    pids = tmp_path / "pids"
    pids.mkdir()
    stub = python_stub(tmp_path / "bin", f"""
case "${{1:-}}" in */run/train.py)
  sleep 300 &
  echo "$!" > {pids}/helper_$RANK_ID
  echo $$ > {pids}/rank_$RANK_ID
  wait ;;
esac""")
    proc, started = _run_until_ranks_started(stub, pids, 4, ["--rank-table", rank_table(tmp_path, devices=2),
                                                             "--grace-period", 10, "--log-dir", tmp_path / "logs",
                                                             ascend_yaml(tmp_path, 2)])
    try:
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert time.monotonic() - sent < 5
        assert [pid for pid in started.values() if alive(pid)] == []
        assert _stderr(stub).splitlines() == [
            f"distributed_train.sh: stopped by SIGTERM: every rank was stopped (logs in {tmp_path / 'logs'})"]
    finally:
        proc.kill()
        kill_all(started.values())


def test_a_second_launch_into_the_same_log_folder_or_port_is_refused(tmp_path):
    stub, pids = _sleeping_ranks(tmp_path)
    logs, config = tmp_path / "logs", micro_yaml(tmp_path)
    proc, ranks = _run_until_ranks_started(stub, pids, 3, ["--cpu", "--workers", 2, "--master-port", 8251,
                                                           "--log-dir", logs, config])
    try:
        same_folder = launcher("--cpu", "--workers", 2, "--master-port", 8253, "--log-dir", logs, config,
                               env=_env(stub), timeout=60)
        assert same_folder.returncode == 2 and same_folder.stderr == (
            f"distributed_train.sh: error: --log-dir {logs} is used by another launch that is still running; wait "
            f"for it or give another --log-dir\n")
        with socket.socket() as listener:  # as msrun's scheduler would be (the stub ranks do not listen)
            listener.bind(("", 8257))
            listener.listen()
            same_port = launcher("--cpu", "--workers", 2, "--master-port", 8257, "--log-dir", tmp_path / "other",
                                 config, env=_env(stub), timeout=60)
        assert same_port.returncode == 2 and "--master-port 8257 is in use on this machine" in same_port.stderr
        assert len(list(pids.iterdir())) == 3 and (logs / "worker_0.log").read_text() == "MS_WORKER 0 is up\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        kill_all(ranks.values())


def test_msrun_failure_names_the_failed_rank_even_when_the_scheduler_dies_too(tmp_path):
    # The scheduler and rank 1 fail at once, before they can be recognised: the rank is named by
    # msrun's start order, never a healthy rank.
    stub, pids = _sleeping_ranks(tmp_path, fail='if [ "${MS_ROLE:-}" = MS_SCHED ]; then exit 1; fi; '
                                                'if [ "$RANK_ID" = 1 ]; then exit 7; fi')
    logs = tmp_path / "logs"
    result = launcher("--cpu", "--workers", 4, "--master-port", 8255, "--grace-period", GRACE, "--log-dir", logs,
                      micro_yaml(tmp_path), env=_env(stub), timeout=60)
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.splitlines()
    assert f"rank 1 exited with code 7 (see {logs}/worker_1.log)" in line
    assert not any(f"rank {healthy} " in line for healthy in (0, 2, 3))
    started = [int(p.read_text()) for p in pids.iterdir() if p.read_text().strip()]
    assert [pid for pid in started if alive(pid)] == []


def test_a_reader_that_goes_away_does_not_change_the_result(tmp_path):
    # `distributed_train.sh ... | head`, or stdout closed: the launch still ends with its own exit code.
    stub = python_stub(tmp_path / "bin", """
case "${1:-}" in */run/train.py)
  for i in $(seq 2000); do echo "rank $RANK_ID line $i"; done
  sleep 1
  exit 0 ;;
esac""")
    args = ["bash", str(SCRIPT), "--rank-table", str(rank_table(tmp_path, devices=2)), "--log-dir",
            str(tmp_path / "logs"), str(ascend_yaml(tmp_path, 2))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(stub))
    proc.stdout.close()  # the reader is gone before the first line
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    closed = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", *args], capture_output=True, env=_env(stub),
                            timeout=60)
    assert (closed.returncode, closed.stderr) == (0, b"")


def test_a_quick_second_signal_cuts_the_grace_period_short(tmp_path):
    # Ranks that take 20 s to honour SIGTERM; a double Ctrl-C must not wait for them.
    pids = tmp_path / "pids"
    pids.mkdir()
    stub = python_stub(tmp_path / "bin", f"""
case "${{1:-}}" in */run/train.py)
  trap 'sleep 20; exit 143' TERM
  echo $$ > {pids}/rank_$RANK_ID
  while true; do sleep 0.1; done ;;
esac""")
    proc, ranks = _run_until_ranks_started(stub, pids, 2, ["--rank-table", rank_table(tmp_path, devices=2),
                                                           "--grace-period", 30, "--log-dir", tmp_path / "logs",
                                                           ascend_yaml(tmp_path, 2)])
    try:
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - sent < 5
        assert "needed SIGKILL at a second signal" in _stderr(stub)
        assert [pid for pid in ranks.values() if alive(pid)] == []
    finally:
        proc.kill()
        kill_all(ranks.values())
